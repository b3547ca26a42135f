#!/usr/bin/env bash
# On a GPU machine: Peregrine's `bench` beside llama.cpp's `llama-bench` on the same GGUF files of
# the random Llama-3-8B-shaped model (pp512, pp2048, pp8192, tg128, tg64 at depths 4096 and 16384),
# one table with the ratios.
#   bash scripts/gpu_llamabench.sh PEREGRINE_BINARY LLAMACPP_BIN_DIR [TYPES] [MODEL_DIR] [WORK_DIR]
# TYPES: comma-separated among bf16, q8_0, q4_0, q4_k_m (default: all four). The BF16 file comes
# from `peregrine quantize`, the others from it by llama-quantize, so both engines read the same
# bytes. Extra arguments for scripts/gpu_llamabench.py go in BENCH_ARGS (e.g. "--depths").
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 LCPP=$2 TYPES=${3:-bf16,q8_0,q4_0,q4_k_m} MODEL=${4:-/tmp/llama-3-8b-shape} WORK=${5:-/tmp/serving-bench}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LCPP:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || python3 scripts/make_gpu_model.py "$MODEL"
[ -f "$WORK/m-bf16.gguf" ] || "$BIN" quantize -m "$MODEL" --type BF16 -o "$WORK/m-bf16.gguf" > /dev/null
files=()
for t in ${TYPES//,/ }; do
    if [ "$t" != bf16 ] && [ ! -f "$WORK/m-$t.gguf" ]; then
        "$LCPP/llama-quantize" "$WORK/m-bf16.gguf" "$WORK/m-$t.gguf" "${t^^}" 16 > /dev/null 2>&1
    fi
    files+=("$WORK/m-$t.gguf")
done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
# shellcheck disable=SC2086
python3 scripts/gpu_llamabench.py --binary "$BIN" --llama-bench "$LCPP/llama-bench" ${BENCH_ARGS:-} "${files[@]}"
