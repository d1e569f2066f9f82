#!/usr/bin/env bash
# The causal-LM engine comparison in bf16 on one CUDA GPU, in about 5 minutes on an H100-class card:
# SmolLM2-135M's shapes and a 6.9B Llama-shaped model (4096 x 32), full FT / LoRA r=8 / SAFT / limit, with
# and without gradient checkpointing, then phase 1 one pass vs block by block. Memory is CUDA's allocated
# memory over the loaded model. SmolLM2's weights are used when the asset is cached, its shapes otherwise
# (synthetic weights: the same shapes, hence the same time and memory).
#
#     bash benchmarks/llm_engine_gpu.sh            # writes benchmarks/results/llm_engine_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
small=llama:576x30
if "$PY" -c "from saftune.models.causal_lm import smollm2_gguf; smollm2_gguf()" 2>/dev/null; then small=smollm2; fi
out=benchmarks/results/llm_engine_gpu.json
"$PY" benchmarks/llm_engine.py --device cuda --dtypes bf16 --models "$small" --batch 8 --steps 5 --warmup 2 \
    --batches 8 --out "$out"
"$PY" benchmarks/llm_engine.py --device cuda --dtypes bf16 --models llama:4096x32 --batch 4 --steps 3 --warmup 1 \
    --batches 4 --update --out "$out"
