#!/usr/bin/env bash
# On a GPU machine: Peregrine's `bench` beside llama.cpp's `llama-bench` on the same GGUF files of a
# random Qwen3-30B-A3B-shaped mixture of experts (BF16, and Q4_K_M made from it by llama-quantize),
# with the weights Peregrine reads per decoded token against the active parameters' bytes.
#   bash scripts/gpu_moe_bench.sh PEREGRINE_BINARY LLAMACPP_BIN_DIR [LAYERS] [WORK_DIR]
# LAYERS (default 24 of the model's 48) keeps the BF16 file and its Q4_K_M on a 64 GB disk; every
# layer has the full model's shape. GGUF_PY: llama.cpp's gguf-py directory when `gguf` is not
# installed. Extra arguments for scripts/gpu_llamabench.py go in BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 LCPP=$2 LAYERS=${3:-24} WORK=${4:-/tmp/moe-bench}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LCPP:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
[ -f "$WORK/moe-bf16.gguf" ] || python3 scripts/make_gpu_moe_gguf.py "$WORK/moe-bf16.gguf" --layers "$LAYERS" ${GGUF_PY:+--gguf-py "$GGUF_PY"}
[ -f "$WORK/moe-q4_k_m.gguf" ] || "$LCPP/llama-quantize" "$WORK/moe-bf16.gguf" "$WORK/moe-q4_k_m.gguf" Q4_K_M "$(nproc)" > /dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
# shellcheck disable=SC2086
python3 scripts/gpu_llamabench.py --binary "$BIN" --llama-bench "$LCPP/llama-bench" --pp 512 2048 --tg 128 --depths 4096 \
    ${BENCH_ARGS:-} "$WORK/moe-bf16.gguf" "$WORK/moe-q4_k_m.gguf"
