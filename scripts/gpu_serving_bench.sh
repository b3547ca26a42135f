#!/usr/bin/env bash
# On a GPU machine: Peregrine's `bench --batched` beside llama.cpp's llama-batched-bench on the
# same Llama-3-8B-shaped GGUF file, same GPU, PP 128 / TG 128, the two engines alternating.
#   bash scripts/gpu_serving_bench.sh PEREGRINE_BINARY LLAMACPP_BIN_DIR TYPE [ROUNDS] [MODEL_DIR] [WORK_DIR]
# TYPE is bf16 or q4_k_m. The random-weight model is made by scripts/make_gpu_model.py; the BF16
# GGUF by `peregrine quantize`, the Q4_K_M one from it by llama-quantize. NPL (default
# 1,2,4,8,16,32,64,128,256) sets the batch sizes; extra Peregrine flags go in PEREGRINE_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 LCPP=$2 TYPE=$3 ROUNDS=${4:-2} MODEL=${5:-/tmp/llama-3-8b-shape} WORK=${6:-/tmp/serving-bench}
NPL=${NPL:-1,2,4,8,16,32,64,128,256}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LCPP:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || python3 scripts/make_gpu_model.py "$MODEL"
[ -f "$WORK/m-bf16.gguf" ] || "$BIN" quantize -m "$MODEL" --type BF16 -o "$WORK/m-bf16.gguf"
if [ "$TYPE" = q4_k_m ] && [ ! -f "$WORK/m-q4_k_m.gguf" ]; then
    "$LCPP/llama-quantize" "$WORK/m-bf16.gguf" "$WORK/m-q4_k_m.gguf" Q4_K_M 16 > /dev/null
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for round in $(seq "$ROUNDS"); do
    echo "## round $round: peregrine $TYPE"
    # shellcheck disable=SC2086
    "$BIN" bench --batched --device cuda -m "$WORK/m-$TYPE.gguf" --npp 128 --ntg 128 --npl ${NPL//,/ } ${PEREGRINE_FLAGS:-}
    echo "## round $round: llama.cpp $TYPE"
    "$LCPP/llama-batched-bench" -m "$WORK/m-$TYPE.gguf" -ngl 99 -fa 1 -c 70000 -npp 128 -ntg 128 -npl "$NPL" 2>&1 | grep '^|'
done
