#!/usr/bin/env bash
# On the CPU: Peregrine's `bench --batched` beside llama.cpp's llama-batched-bench on the same
# GGUF file, same threads, PP 128 / TG 128, the engines alternating round by round.
#   bash scripts/cpu_serving_bench.sh PEREGRINE_BINARY LLAMACPP_BIN_DIR GGUF [ROUNDS] [THREADS]
# NPL (default 1,2,4,8,16,32,64) sets the batch sizes. Each round runs Peregrine with an f32 KV
# cache (its default), with an F16 one (llama.cpp's default), then llama.cpp, and prints the load
# average before each, since a busy machine moves the figures (llama.cpp's spinning threads most).
set -euo pipefail
BIN=$1 LCPP=$2 GGUF=$3 ROUNDS=${4:-2} THREADS=${5:-2}
NPL=${NPL:-1,2,4,8,16,32,64}
export LD_LIBRARY_PATH=$LCPP:${LD_LIBRARY_PATH:-}
for round in $(seq "$ROUNDS"); do
    for kv in f32 f16; do
        echo "## round $round: peregrine, $kv KV cache (load $(cut -d' ' -f1 /proc/loadavg))"
        "$BIN" bench --batched -m "$GGUF" -t "$THREADS" --npp 128 --ntg 128 --npl ${NPL//,/ } --kv-cache-type $kv | grep '^|'
    done
    echo "## round $round: llama.cpp (load $(cut -d' ' -f1 /proc/loadavg))"
    "$LCPP/llama-batched-bench" -m "$GGUF" -t "$THREADS" -c 20000 -npp 128 -ntg 128 -npl "$NPL" 2>&1 | grep '^|'
done
