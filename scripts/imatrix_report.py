#!/usr/bin/env python3
"""Quantization with and without an importance matrix on the reference model (models/target),
measured against its BF16 weights: the figures of QUANTIZATION.md's importance-matrix section.

1. The model as a BF16 GGUF file (`peregrine quantize --type BF16`: the shipped weights as they
   are), the base of every comparison.
2. An importance matrix over the validation split (models/corpus/validation.txt; the test split
   is only scored), by `peregrine imatrix`, and one by llama.cpp's llama-imatrix on the BF16 file.
3. For each type: `peregrine quantize` plain and with --imatrix (Peregrine's matrix), and
   llama-quantize --imatrix (llama.cpp's matrix) from the BF16 file.
4. The BF16 file's token distributions over the test split (`peregrine perplexity
   --kl-divergence-base`), then every file through `peregrine perplexity --kl-divergence`:
   perplexity on the test split, mean KL divergence, same top token; file size and bits per
   weight (every tensor of the file) from the GGUF header. With --llama-perplexity, llama.cpp's
   llama-perplexity --kl-divergence runs on the same files and base too.

Needs a release build (swift build -c release), llama.cpp's llama-imatrix, llama-quantize and
llama-perplexity built from source (see scripts/make_imatrix_fixture.py), Python with gguf.
Run:  python3 scripts/imatrix_report.py --llama-bin LLAMA_CPP/build/bin [--types Q4_0 Q4_K_M Q8_0] [--llama-perplexity]
      [--chunks N] [--reuse]
(--chunks scores the first N chunks of the test split only; --reuse keeps the files a run already
made: the BF16 file, both matrices, the quantized files and the base distributions.)
Files go to .bench-models/imatrix (the base distributions take ~550 MB); the table goes to stdout
and the figures to .bench-models/imatrix/report.json.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MODEL = os.path.join(ROOT, "models", "target")
CALIBRATION = os.path.join(ROOT, "models", "corpus", "validation.txt")
TEST = os.path.join(ROOT, "models", "corpus", "test.txt")


def run(cmd, env=None):
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.time()
    # Output through files: llama.cpp's tools lose the end of what they print into a pipe.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        r = subprocess.run(cmd, stdout=out, stderr=err, text=True, env=env)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    print(f"  {time.time() - start:.1f} s", file=sys.stderr, flush=True)
    return stdout, stderr


def size(path):
    """File MiB and bits per weight over every tensor of the file."""
    from gguf import GGUFReader
    r = GGUFReader(path)
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    params = sum(int(t.n_elements) for t in r.tensors)
    return os.path.getsize(path) / 2**20, 8 * nbytes / params


def llama_kl(log):
    def value(label):
        return float(re.search(re.escape(label) + r"\s*:\s*([-0-9.]+)", log).group(1))
    return {"ppl": value("Mean PPL(Q)"), "kld": value("Mean    KLD"), "same_top_p": value("Same top p")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", help="directory of llama.cpp's llama-imatrix, llama-quantize, llama-perplexity")
    ap.add_argument("--peregrine", default=os.path.join(ROOT, ".build", "release", "peregrine"))
    ap.add_argument("--work", default=os.path.join(ROOT, ".bench-models", "imatrix"))
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", default="2")
    ap.add_argument("--llama-perplexity", action="store_true", help="also llama-perplexity --kl-divergence on every file")
    ap.add_argument("--table", action="store_true", help="only print the tables of the last run's report.json")
    ap.add_argument("--chunks", help="score only the first N chunks of the test split")
    ap.add_argument("--reuse", action="store_true", help="keep the files an earlier run made (matrices, quantized files, base)")
    args = ap.parse_args()
    if args.table:
        table(json.load(open(os.path.join(os.path.abspath(args.work), "report.json"))))
        return
    if not args.llama_bin:
        ap.error("--llama-bin is required")
    p, w, t = os.path.abspath(args.peregrine), os.path.abspath(args.work), args.threads
    bindir = os.path.abspath(args.llama_bin)
    env = dict(os.environ, LD_LIBRARY_PATH=bindir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    tool = lambda name: os.path.join(bindir, name)  # noqa: E731
    os.makedirs(w, exist_ok=True)

    def make(path, cmd, env=None):
        if not (args.reuse and os.path.exists(path)):
            run(cmd, env=env)

    chunks = ["--chunks", args.chunks] if args.chunks else []
    bf16 = os.path.join(w, "target-bf16.gguf")
    make(bf16, [p, "quantize", "-m", MODEL, "--type", "BF16", "-o", bf16, "-t", t])
    ours, theirs = os.path.join(w, "peregrine.imatrix.gguf"), os.path.join(w, "llama.imatrix.gguf")
    make(ours, [p, "imatrix", "-m", MODEL, "-f", CALIBRATION, "-o", ours, "-t", t])
    make(theirs, [tool("llama-imatrix"), "-m", bf16, "-f", CALIBRATION, "-o", theirs, "-c", "512", "-t", t], env=env)
    files = []
    for ty in args.types:
        plain, weighted, llama = (os.path.join(w, f"target-{ty}{s}.gguf") for s in ["", "-imatrix", "-llama-imatrix"])
        make(plain, [p, "quantize", "-m", MODEL, "--type", ty, "-o", plain, "-t", t])
        make(weighted, [p, "quantize", "-m", MODEL, "--type", ty, "-o", weighted, "--imatrix", ours, "-t", t])
        make(llama, [tool("llama-quantize"), "--imatrix", theirs, bf16, llama, ty, t], env=env)
        files += [(ty, "peregrine quantize", plain), (ty, "peregrine quantize --imatrix", weighted),
                  (ty, "llama-quantize --imatrix", llama)]
    base = os.path.join(w, "target-bf16.kld")
    make(base, [p, "perplexity", "-m", bf16, "-f", TEST, "--kl-divergence-base", base, "--json", "-t", t])
    base_ppl = None
    rows = []
    for ty, how, path in files:
        out, _ = run([p, "perplexity", "-m", path, "--kl-divergence-base", base, "--kl-divergence", "--json", "-t", t] + chunks)
        r = json.loads(out)
        # The base model's perplexity over the same chunks, as the comparison computed it.
        base_ppl = {"perplexity": r["base_perplexity"]["value"], "uncertainty": r["base_perplexity"]["uncertainty"],
                    "chunks": r["chunks"]}
        mib, bpw = size(path)
        row = {"type": ty, "how": how, "file": os.path.relpath(path, ROOT), "mib": mib, "bpw": bpw,
               "ppl": r["perplexity"], "kld": r["kl_divergence"], "kld_percentiles": r["kl_divergence_percentiles"],
               "same_top_p": r["same_top_p"], "ppl_ratio": r["perplexity_ratio"]}
        if args.llama_perplexity:
            o, e = run([tool("llama-perplexity"), "-m", path, "--kl-divergence-base", base, "--kl-divergence", "-t", t]
                       + (["--chunks", args.chunks] if args.chunks else []), env=env)
            row["llama-perplexity"] = llama_kl(o + e)
        rows.append(row)
    mib, bpw = size(bf16)
    report = {"base": {"file": os.path.relpath(bf16, ROOT), "mib": mib, "bpw": bpw, "ppl": base_ppl}, "rows": rows}
    with open(os.path.join(w, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    table(report)


def table(report):
    b = report["base"]
    print("| type | quantized by | size MiB | bits/weight | PPL (test split) | PPL / PPL(BF16) | mean KLD | median KLD | 99% KLD | max KLD | same top token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| BF16 | (the shipped weights) | {b['mib']:.1f} | {b['bpw']:.2f} | {b['ppl']['perplexity']:.4f} ± {b['ppl']['uncertainty']:.4f} "
          "| 1 | 0 | 0 | 0 | 0 | 100% |")
    for r in report["rows"]:
        k = r["kld_percentiles"]
        print(f"| {r['type']} | `{r['how']}` | {r['mib']:.1f} | {r['bpw']:.2f} | {r['ppl']['value']:.4f} ± {r['ppl']['uncertainty']:.4f} "
              f"| {r['ppl_ratio']['value']:.5f} ± {r['ppl_ratio']['uncertainty']:.5f} "
              f"| {r['kld']['value']:.5f} ± {r['kld']['uncertainty']:.5f} | {k['median']:.5f} | {k['p99']:.5f} | {k['max']:.4f} "
              f"| {100 * r['same_top_p']['value']:.2f} ± {100 * r['same_top_p']['uncertainty']:.2f} % |")
    if all("llama-perplexity" in r for r in report["rows"]):
        print()
        print("| type | quantized by | PPL: peregrine / llama-perplexity | mean KLD: peregrine / llama-perplexity | same top token: peregrine / llama-perplexity |")
        print("|---|---|---|---|---|")
        for r in report["rows"]:
            l = r["llama-perplexity"]
            print(f"| {r['type']} | `{r['how']}` | {r['ppl']['value']:.4f} / {l['ppl']:.4f} | {r['kld']['value']:.6f} / {l['kld']:.6f} "
                  f"| {100 * r['same_top_p']['value']:.3f} / {l['same_top_p']:.3f} % |")


if __name__ == "__main__":
    main()
