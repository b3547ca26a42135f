#!/usr/bin/env bash
# On a GPU machine: the same requests through `peregrine serve` (64 concurrent streaming clients
# of scripts/serve_load.py) and through the engine offline (`peregrine bench --throughput`),
# rounds alternating, on the Llama-3-8B-shaped BF16 GGUF file.
#   bash scripts/gpu_server_vs_offline.sh PEREGRINE_BINARY [ROUNDS] [MODEL_DIR] [WORK_DIR]
# Requests: CLIENTS (64) x PER_CLIENT (2) of INPUT (508) random prompt token ids and OUTPUT (128)
# generated tokens (greedy, EOS ignored), at most CLIENTS sequences at once. The server is sent
# the prompts as token ids (serve_load.py --prompt-tokens), so both read the same prompt tokens.
# Extra flags for both (engine options such as --batch-tokens) in PEREGRINE_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 ROUNDS=${2:-2} MODEL=${3:-/tmp/llama-3-8b-shape} WORK=${4:-/tmp/serving-bench}
CLIENTS=${CLIENTS:-64} PER_CLIENT=${PER_CLIENT:-2} INPUT=${INPUT:-508} OUTPUT=${OUTPUT:-128} PORT=${PORT:-8080}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
mkdir -p "$WORK"
[ -f "$MODEL/config.json" ] || python3 scripts/make_gpu_model.py "$MODEL"
[ -f "$WORK/m-bf16.gguf" ] || "$BIN" quantize -m "$MODEL" --type BF16 -o "$WORK/m-bf16.gguf"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for round in $(seq "$ROUNDS"); do
    echo "## round $round: offline"
    # shellcheck disable=SC2086
    "$BIN" bench --throughput --device cuda -m "$WORK/m-bf16.gguf" --requests $((CLIENTS * PER_CLIENT)) \
        --input-len "$INPUT" --output-len "$OUTPUT" --max-sequences "$CLIENTS" ${PEREGRINE_FLAGS:-}
    echo "## round $round: server, $CLIENTS clients"
    # shellcheck disable=SC2086
    "$BIN" serve --device cuda -m "$WORK/m-bf16.gguf" --port "$PORT" --max-sequences "$CLIENTS" \
        --max-queue $((CLIENTS * 4)) ${PEREGRINE_FLAGS:-} > "$WORK/server-$round.log" 2>&1 &
    server=$!
    url="http://127.0.0.1:$PORT"
    for _ in $(seq 600); do python3 -c "import urllib.request as u; u.urlopen('$url/health')" 2> /dev/null && break; sleep 0.5; done
    python3 scripts/serve_load.py --url "$url" --clients "$CLIENTS" --requests "$PER_CLIENT" \
        --max-tokens "$OUTPUT" --prompt-tokens "$INPUT" --warmup 2
    python3 -c "import urllib.request as u; print(u.urlopen('$url/metrics').read().decode())" |
        grep -E '^peregrine_(engine_steps|preemptions|generation_tokens|prompt_tokens|prefix_cache)' || true
    kill -INT "$server"
    wait "$server" || true
done
