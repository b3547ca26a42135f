#!/usr/bin/env bash
# On a GPU machine (Hopper): checks and measures the warpgroup-MMA prompt attention kernels
# (attention_prefill_wgmma_128*) in one command.
#   bash scripts/gpu_prompt_attention.sh PEREGRINE_BINARY TESTS.tar.xz [MODEL_DIR] [WORK_DIR]
# 1. the tensor-core prompt attention test (every kernel against the CPU; scripts/gpu_tests.sh's bundle);
# 2. scripts/fa_lab.cu (where nvcc is): each kernel alone on pp8192's 16 chunks, beside mma.sync;
# 3. `bench -p 512 -p 2048 -p 8192 -n 0` on the 8B-shaped BF16 file with the default kernel and
#    each PEREGRINE_WGMMA_PROMPT_ATTENTION choice (0: mma.sync), alternating, ROUNDS rounds (default 2).
# PARTS picks some of them (default "test lab bench"); CHOICES the bench's kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=$1 BUNDLE=$2 MODEL=${3:-/tmp/llama-3-8b-shape} WORK=${4:-/tmp/serving-bench}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
PARTS=${PARTS:-test lab bench}
if [[ " $PARTS " == *" test "* ]]; then
echo "== test"
TESTS=CUDABackendTests/testTensorCorePromptAttentionMatchesCPU bash scripts/gpu_tests.sh run "$BUNDLE" 2>&1 | grep -E "error|passed|failed|Executed" | head -40
fi
if [[ " $PARTS " == *" lab "* ]]; then
echo "== fa_lab"
if command -v nvcc > /dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
    NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    if "$NVCC" -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 --use_fast_math -o "$WORK/fa_lab" scripts/fa_lab.cu > "$WORK/fa_lab.log" 2>&1; then
        # Each variant in its own process (with the mma.sync reference), so one that faults costs only its row.
        i=1
        while FA_VARIANT=$i timeout 60 "$WORK/fa_lab" > "$WORK/fa_lab.out" 2>&1; rc=$?; [ $rc -ne 2 ]; do
            tail -n +$([ "$i" = 1 ] && echo 1 || echo 4) "$WORK/fa_lab.out"
            [ $rc -eq 0 ] || echo "(variant $i: exit $rc)"
            i=$((i + 1))
        done
    else
        head -30 "$WORK/fa_lab.log"
    fi
else
    echo "no nvcc"
fi
fi
if [[ " $PARTS " == *" bench "* ]]; then
echo "== bench"
[ -f "$MODEL/config.json" ] || python3 scripts/make_gpu_model.py "$MODEL"
[ -f "$WORK/m-bf16.gguf" ] || "$BIN" quantize -m "$MODEL" --type BF16 -o "$WORK/m-bf16.gguf" > /dev/null
for round in $(seq "${ROUNDS:-2}"); do
    for choice in ${CHOICES:-default 0 1 overlap wg2 wg2_overlap kt128_wg2_overlap}; do
        if [ "$choice" = default ]; then unset PEREGRINE_WGMMA_PROMPT_ATTENTION; else export PEREGRINE_WGMMA_PROMPT_ATTENTION=$choice; fi
        printf 'round %s %-18s ' "$round" "$choice"
        timeout 300 "$BIN" bench --device cuda -m "$WORK/m-bf16.gguf" -p 512 -p 2048 -p 8192 -n 0 -r 2 --kv-cache-type f16 --json 2>&1 \
            | python3 -c "import json, sys; rows = [json.loads(l) for l in sys.stdin if l.startswith('{')]; print(' '.join(f\"{r['test']} {r['tokens_per_second']:.0f}\" for r in rows) or 'no result')"
    done
done
unset PEREGRINE_WGMMA_PROMPT_ATTENTION
fi
