#!/usr/bin/env python3
"""QUANTIZATION.md's tables: for each quantization type, the file `peregrine quantize` writes,
its size and bits per weight, its perplexity on the reference model's test split by Peregrine
and by llama.cpp's llama-perplexity (same file, same method), and prompt/generation speed of
both engines on that file, measured alternately in one run.

Run with the interpreter of scripts/compare_llamacpp.py, after `swift build -c release`:
  .venv-bench/bin/python scripts/quantization_report.py [--rounds 3] [--models target llama-1b-shape]

The 1B-shaped model has random weights, so its perplexity says nothing and is not measured.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_llamacpp import BENCH_MODELS, ROOT, llama_cpp_tool, run_llama, run_peregrine  # noqa: E402

PEREGRINE = os.path.join(ROOT, ".build", "release", "peregrine")
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0"]
SOURCES = {"target": os.path.join(ROOT, "models", "target"), "llama-1b-shape": os.path.join(BENCH_MODELS, "llama-1b-shape")}
TEXT = os.path.join(ROOT, "models", "corpus", "test.txt")


def quantize(source, mix, out):
    if not os.path.exists(out):
        subprocess.run([PEREGRINE, "quantize", "-m", source, "--type", mix, "-o", out], check=True, capture_output=True)
    return out


def parameters(path):
    out = subprocess.run([PEREGRINE, "bench", "-m", path, "-p", "1", "-n", "1", "-r", "1", "--json"], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[0])


def perplexity_ours(path, threads):
    out = subprocess.run([PEREGRINE, "perplexity", "-m", path, "-f", TEXT, "-c", "512", "-t", str(threads), "--json"],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["perplexity"], r["uncertainty"]


def perplexity_llama(path, threads):
    out = subprocess.run([llama_cpp_tool("llama-perplexity"), "-m", path, "-f", TEXT, "-c", "512", "-t", str(threads)],
                         check=True, capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", nargs="*", default=list(SOURCES))
    ap.add_argument("--types", nargs="*", default=TYPES)
    args = ap.parse_args()
    results = []
    for model in args.models:
        for mix in args.types:
            path = quantize(SOURCES[model], mix, os.path.join(BENCH_MODELS, f"{model}.peregrine-{mix}.gguf"))
            info = parameters(path)
            row = {"model": model, "type": mix, "bytes": os.path.getsize(path), "weight_bytes": info["size_bytes"],
                   "parameters": info["params"]}
            if model == "target":
                row["ppl_peregrine"] = perplexity_ours(path, args.threads)
                row["ppl_llama_cpp"] = perplexity_llama(path, args.threads)
            ours, theirs = {"pp": [], "tg": []}, {"pp": [], "tg": []}
            for r in range(args.rounds):
                order = [(run_peregrine, ours), (run_llama, theirs)]
                if r % 2:
                    order.reverse()
                for fn, acc in order:
                    res = fn(path, args.threads, 512, 128)
                    acc["pp"].append(res["pp"])
                    acc["tg"].append(res["tg"])
            for t in ("pp", "tg"):
                row[f"{t}_peregrine"] = statistics.median(ours[t])
                row[f"{t}_llama_cpp"] = statistics.median(theirs[t])
            print(json.dumps(row), flush=True)
            results.append(row)
    with open(os.path.join(BENCH_MODELS, "quantization_report.json"), "w") as f:
        json.dump(results, f, indent=1)
    print()
    print(f"| model | type | size MiB | bits/weight | PPL Peregrine | PPL llama.cpp | diff | pp512 Peregrine | pp512 llama.cpp | "
          f"ratio | tg128 Peregrine | tg128 llama.cpp | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bpw = 8 * r["weight_bytes"] / r["parameters"]
        if "ppl_peregrine" in r:
            (a, ea), (b, eb) = r["ppl_peregrine"], r["ppl_llama_cpp"]
            ppl = f"{a:.4f} ± {ea:.4f} | {b:.4f} ± {eb:.4f} | {100 * (a - b) / b:+.3f}%"
        else:
            ppl = "— | — | —"
        print(f"| {r['model']} | {r['type']} | {r['bytes'] / 1048576:.1f} | {bpw:.2f} | {ppl} | "
              f"{r['pp_peregrine']:.1f} | {r['pp_llama_cpp']:.1f} | {r['pp_peregrine'] / r['pp_llama_cpp']:.2f}x | "
              f"{r['tg_peregrine']:.2f} | {r['tg_llama_cpp']:.2f} | {r['tg_peregrine'] / r['tg_llama_cpp']:.2f}x |")


if __name__ == "__main__":
    main()
