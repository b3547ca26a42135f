#!/usr/bin/env bash
# On a GPU machine: prompt (pp512) and generation (tg128) speed of each quantization type,
# Peregrine's `bench` beside llama.cpp's `llama-bench` on the same GGUF files (the engines
# alternating file by file, ROUNDS times over, medians), one table with the ratios.
#   bash scripts/gpu_quant_speed.sh PEREGRINE_BINARY LLAMACPP_BIN_DIR MODEL_DIR [TYPES] [ROUNDS] [WORK_DIR]
# MODEL_DIR: a Hugging Face model directory (the shipped reference model, models/target, or the
# Llama-3-8B shape of scripts/make_gpu_model.py). TYPES: comma-separated `quantize --type` names
# (default: every type the CUDA backend runs). Every file comes from `peregrine quantize`
# (plain rounding), which writes llama-quantize's bytes for these types.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 LCPP=$2 MODEL=$3
TYPES=${4:-BF16,Q8_0,Q6_K,Q4_K_M,Q4_0,IQ4_NL,IQ4_XS,Q3_K_L,Q3_K_M,Q3_K_S,Q2_K} ROUNDS=${5:-3}
WORK=${6:-/tmp/quant-speed/$(basename "$MODEL")}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LCPP:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
files=()
for t in ${TYPES//,/ }; do
    f="$WORK/m-$t.gguf"
    [ -f "$f" ] || "$BIN" quantize -m "$MODEL" --type "$t" -o "$f" > /dev/null
    files+=("$f")
done
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 scripts/gpu_llamabench.py --binary "$BIN" --llama-bench "$LCPP/llama-bench" --pp 512 --tg 128 --depths \
    --rounds "$ROUNDS" "${files[@]}"
