#!/usr/bin/env python3
"""Peregrine's `bench` beside llama.cpp's `llama-bench` on the same GGUF files and GPU: prompt
processing (pp512, pp2048, pp8192), generation from an empty cache (tg128) and at depths
(tg64 @ d4096, tg64 @ d16384), for each file, the two engines alternating file by file; then
one table of tokens/s with the ratios (Peregrine / llama.cpp).

Run on the GPU machine through scripts/gpu_llamabench.sh (it makes the files).
    python3 scripts/gpu_llamabench.py --binary BIN --llama-bench LLAMA_BENCH FILE.gguf [FILE.gguf ...]
On the CPU (both engines with the same threads, llama-bench's CPU build with its defaults):
    python3 scripts/gpu_llamabench.py --device cpu --threads 2 --rounds 3 --pp 512 --depths --binary BIN \
        --llama-bench LLAMA_BENCH FILE.gguf [...]
With --rounds R the files are measured R times over, the engines alternating each time, and the
table gives medians.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def peregrine(binary, path, pp, tg, depths, dtg, reps, device, reads=None, threads=None, extra=()):
    """{test name: tokens/s} from `peregrine bench --json` (names as llama-bench's: 'tg64 @ d4096');
    for a mixture of experts, `reads` gets {test: (weight bytes read per decoded token, active bytes)}."""
    out = {}
    runs = [["-p"] + [str(p) for p in pp] + ["-n"] + [str(n) for n in tg]]
    if depths:
        runs.append(["-p", "0", "-n", str(dtg), "-d"] + [str(d) for d in depths])
    for args in runs:
        r = subprocess.run([binary, "bench", "--device", device, "-m", path, "-r", str(reps), "--json"] + args
                           + (["-t", str(threads)] if threads else []) + list(extra),
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            continue
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                j = json.loads(line)
                out[j["test"]] = j["tokens_per_second"]
                if reads is not None and "decode_bytes_read_per_token" in j and j["test"].startswith("tg"):
                    reads[j["test"]] = (j["decode_bytes_read_per_token"], j["decode_bytes_per_token"])
    return out


def llamacpp(tool, path, pp, tg, depths, dtg, reps, device="cuda", threads=None):
    """{test name: tokens/s} from `llama-bench -o jsonl`: on the GPU with flash attention and every
    layer there, on the CPU with its defaults."""
    out = {}
    runs = [["-p", ",".join(map(str, pp)), "-n", ",".join(map(str, tg))]]
    if depths:
        runs.append(["-p", "0", "-n", str(dtg), "-d", ",".join(map(str, depths))])
    for args in runs:
        placement = ["-ngl", "99", "-fa", "1"] if device == "cuda" else []
        r = subprocess.run([tool, "-m", path, "-r", str(reps), "-o", "jsonl"] + placement + args
                           + (["-t", str(threads)] if threads else []),
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            continue
        for line in r.stdout.splitlines():
            if not line.startswith("{"):
                continue
            j = json.loads(line)
            name = f"pp{j['n_prompt']}" if j["n_prompt"] > 0 else f"tg{j['n_gen']}"
            if j.get("n_depth", 0):
                name += f" @ d{j['n_depth']}"
            out[name] = j["avg_ts"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--pp", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--tg", type=int, nargs="+", default=[128])
    ap.add_argument("--depths", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--depth-tg", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="Peregrine's device (cuda; cpu to check the script where no GPU is)")
    ap.add_argument("--threads", type=int, help="threads for both engines (-t)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every file this many times over; medians")
    ap.add_argument("--peregrine-args", default="",
                    help="more arguments for Peregrine's bench, e.g. '--kv-cache-type f16' (llama.cpp's cache is F16 by default)")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    rows, read_rows = [], []
    ours_all, theirs_all = {}, {}
    for round_index in range(a.rounds):
        for path in a.files:
            reads = {}
            ours = peregrine(a.binary, path, a.pp, a.tg, a.depths, a.depth_tg, a.repetitions, a.device, reads, a.threads,
                             a.peregrine_args.split())
            if round_index == 0:
                read_rows += [(os.path.basename(path), t, r) for t, r in reads.items()]
            print(f"# {os.path.basename(path)} peregrine: {json.dumps(ours)}", flush=True)
            theirs = llamacpp(a.llama_bench, path, a.pp, a.tg, a.depths, a.depth_tg, a.repetitions, a.device, a.threads)
            print(f"# {os.path.basename(path)} llama.cpp: {json.dumps(theirs)}", flush=True)
            for t, v in ours.items():
                ours_all.setdefault((path, t), []).append(v)
            for t, v in theirs.items():
                theirs_all.setdefault((path, t), []).append(v)
    for path in a.files:
        tests = [t for (p, t) in ours_all if p == path] + [t for (p, t) in theirs_all if p == path and (p, t) not in ours_all]
        for test in tests:
            o, l = ours_all.get((path, test)), theirs_all.get((path, test))
            rows.append((os.path.basename(path), test, o and statistics.median(o), l and statistics.median(l)))
    print("| file | test | Peregrine tok/s | llama.cpp tok/s | ratio |")
    print("|---|---|---|---|---|")
    def fmt(x):
        return f"{x:,.1f}" if x else "-"
    for f, test, p, l in rows:
        ratio = f"{p / l:.2f}x" if p and l else "-"
        print(f"| {f} | {test} | {fmt(p)} | {fmt(l)} | {ratio} |")
    if read_rows:
        # Mixtures of experts: the weights Peregrine read per decoded token (router, attention,
        # output and the experts the tokens chose) against the active parameters' bytes.
        print()
        print("| file | test | weights read per token (GB) | active parameters' bytes (GB) | read / active |")
        print("|---|---|---|---|---|")
        for f, test, (read, active) in read_rows:
            print(f"| {f} | {test} | {read / 1e9:.3f} | {active / 1e9:.3f} | {read / active:.3f} |")


if __name__ == "__main__":
    main()
