#!/usr/bin/env python3
"""A/B of Peregrine's measuring switches (the PEREGRINE_* environment settings the backends read
at start) on `peregrine bench`, the variants alternating within each round of one run, as
BENCHMARKS.md's same-binary comparisons are measured:

    python3 scripts/switch_ab.py --binary .build/release/peregrine --model M.gguf \\
        --bench-args "--device cuda -p 0 -n 128 -d 0 4096 -r 2 --kv-cache-type f16" \\
        PEREGRINE_CARRIED_NORM=0 -

A variant is a comma-separated list of NAME=VALUE settings, or "-" for none (the defaults); the
setting binary=PATH runs that variant with another build of peregrine (two builds compared in one
run, alternating, as the switches are). Prints
each round's tokens/s a test as it goes, then a table of each test's median over the rounds by
variant, with each variant's ratio to the first. Exits non-zero if a bench run fails.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys


def parse_variant(text):
    if text == "-":
        return {}
    settings = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"switch_ab: a variant is NAME=VALUE[,NAME=VALUE...] or -, not {text!r}")
        settings[name] = value
    return settings


def run_bench(binary, model, bench_args, settings, timeout):
    env = dict(os.environ)
    settings = dict(settings)
    binary = settings.pop("binary", binary)
    env.update(settings)
    command = [binary, "bench", "-m", model, *bench_args, "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-2000:])
        raise SystemExit(f"switch_ab: {' '.join(command)} exited with {done.returncode}")
    rates = {}
    for line in done.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            rates[row["test"]] = row["tokens_per_second"]
    if not rates:
        raise SystemExit("switch_ab: the bench printed no results")
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", default=".build/release/peregrine")
    parser.add_argument("--model", required=True)
    parser.add_argument("--bench-args", default="-p 0 -n 128 -r 2", help="arguments for `peregrine bench` (one string)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a bench run may take")
    parser.add_argument("variants", nargs="+", help="NAME=VALUE[,NAME=VALUE...] or - (the defaults)")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit("switch_ab: --rounds must be at least 1")
    variants = [(text, parse_variant(text)) for text in args.variants]
    bench_args = shlex.split(args.bench_args)
    results = {text: {} for text, _ in variants}  # variant -> test -> [rates]
    tests = []
    for r in range(1, args.rounds + 1):
        for text, settings in variants:
            rates = run_bench(args.binary, args.model, bench_args, settings, args.timeout)
            for test, rate in rates.items():
                if test not in tests:
                    tests.append(test)
                results[text].setdefault(test, []).append(rate)
            print(f"round {r} {text}: " + ", ".join(f"{t} {v:.2f}" for t, v in rates.items()), flush=True)
    first = variants[0][0]
    print()
    print("| test | " + " | ".join(text for text, _ in variants) + " |")
    print("|---|" + "---|" * len(variants))
    for test in tests:
        cells = []
        base = statistics.median(results[first][test]) if results[first].get(test) else None
        for text, _ in variants:
            rates = results[text].get(test)
            if not rates:
                cells.append("-")
                continue
            median = statistics.median(rates)
            ratio = f" ({median / base:.3f}x)" if base and text != first else ""
            cells.append(f"{median:.2f}{ratio}")
        print(f"| {test} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
