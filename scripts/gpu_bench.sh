#!/usr/bin/env bash
# One command on the GPU machine: makes the random Llama-3-8B-shaped model if it is missing, then
# prints Peregrine's CUDA pp512/tg128 beside transformers' (eager; static cache + torch.compile)
# and the fraction of HBM bandwidth Peregrine's decode reaches.
#   bash scripts/gpu_bench.sh [PEREGRINE_BINARY] [MODEL_DIR]
# The binary is built anywhere with `swift build -c release --static-swift-stdlib`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-.build/release/peregrine}
MODEL=${2:-/tmp/llama-3-8b-shape}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
[ -f "$MODEL/config.json" ] || python3 scripts/make_gpu_model.py "$MODEL"
python3 scripts/gpu_bench.py --binary "$BIN" --model "$MODEL" "${@:3}"
