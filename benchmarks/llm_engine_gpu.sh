#!/usr/bin/env bash
# The causal-LM engine comparison in bf16 on one CUDA GPU, in about 5 minutes on an H100-class card:
#   1. benchmarks/device_kernels.py: the GPU's kernels (the engine's default on CUDA) and phase 1 against
#      the CPU's on a small Llama-shaped model; the run stops here if they disagree;
#   2. SmolLM2-135M's shapes, then the 6.55B Llama-shaped model (4096 x 36) that is SAFT's largest on the
#      22 GiB CPU machine: full FT / LoRA r=8 / SAFT / limit, with and without gradient checkpointing,
#      each method in its own process (GPU timings do not drift as the shared CPU's do);
#   3. phase 1 one pass vs block by block (lean) on both, against one full fine-tuning epoch.
# Memory is CUDA's allocated memory over the loaded model. SmolLM2's weights are used when the asset is
# cached, its shapes otherwise (synthetic weights: the same shapes, hence the same time and memory).
#
#     bash benchmarks/llm_engine_gpu.sh      # writes benchmarks/results/llm_engine_gpu.json (+ .png, _check.jsonl)
# Environment: OUT_JSON (where the JSON goes), PYTHON, and for a dry run elsewhere DEVICE, SMALL, LARGE
# (e.g. DEVICE=cpu SMALL=llama:128x2 LARGE=llama:192x2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's saftune, where it is not installed
device=${DEVICE:-cuda}
out=${OUT_JSON:-benchmarks/results/llm_engine_gpu.json}
small=${SMALL:-llama:576x30}
if [ -z "${SMALL:-}" ] && "$PY" -c "from saftune.models.causal_lm import smollm2_gguf; smollm2_gguf()" 2>/dev/null; then
    small=smollm2
fi
large=${LARGE:-llama:4096x36}

"$PY" benchmarks/device_kernels.py --device "$device" | tee "${out%.json}_check.jsonl"
engine() { "$PY" benchmarks/llm_engine.py --device "$device" --dtypes bf16 --separate --out "$out" "$@"; }
engine --models "$small" --parts step --batch 8 --steps 5 --warmup 2
engine --models "$small" --parts phase1 --batch 8 --steps 2 --warmup 1 --batches 8 --update
engine --models "$large" --parts step --batch 4 --steps 3 --warmup 1 --update
engine --models "$large" --parts phase1 --batch 4 --steps 2 --warmup 1 --batches 4 --update
