#!/usr/bin/env bash
# Speculative decoding on the reference models: plain against speculative greedy generation of
# the same prompt, alternating in one process per configuration (peregrine bench), 128 tokens,
# median of the repetitions. Prompts: bench/prompts/grounded.txt (a passage, then its start
# again: the continuation copies its input) and bench/prompts/open.txt (free continuation).
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release >/dev/null
P=.build/release/peregrine
R=${REPS:-5}
first=1
run() {
  if [ $first = 1 ]; then $P bench -r "$R" -n 128 "$@"; first=0; else $P bench -r "$R" -n 128 "$@" | tail -n +3; fi
}
for k in 2 3 4 7 8; do run --lookup --draft-tokens $k --prompt-file bench/prompts/grounded.txt; done
run --lookup --draft-tokens 8 --adaptive --prompt-file bench/prompts/grounded.txt
for k in 2 3 4 6 7; do run --draft models/draft --draft-tokens $k --prompt-file bench/prompts/open.txt; done
run --draft models/draft --draft-tokens 6 --adaptive --prompt-file bench/prompts/open.txt
run --draft models/draft --draft-tokens 4 --prompt-file bench/prompts/grounded.txt
run --skip-layers 2,4,6 --draft-tokens 3 --prompt-file bench/prompts/open.txt
run --skip-layers 1,3,5,6 --draft-tokens 3 --adaptive --prompt-file bench/prompts/open.txt
run --lookup --draft-tokens 4 --prompt-file bench/prompts/open.txt
