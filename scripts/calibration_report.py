#!/usr/bin/env python3
"""GPTQ and AWQ on the reference model (models/target), measured against its BF16 weights as
scripts/imatrix_report.py measures plain and importance-weighted rounding: the calibration rows
of QUANTIZATION.md's "On the reference model" table.

The calibration text is the validation split (models/corpus/validation.txt), the one the
importance matrices come from; the test split (models/corpus/test.txt) is only scored. For each
type and each method variant:

  peregrine quantize -m models/target --type T -o W/target-T-VARIANT.gguf --method gptq|awq \
      --calibration models/corpus/validation.txt [--act-order] [--imatrix W/peregrine.imatrix.gguf] \
      --calibration-statistics W/validation.calibration-statistics
  peregrine perplexity -m FILE --kl-divergence-base W/target-bf16.kld --kl-divergence --json

with the BF16 file, its base distributions and Peregrine's importance matrix made as
imatrix_report.py makes them when they are not already in W (= .bench-models/imatrix).

Needs a release build (swift build -c release) and Python with gguf (for file sizes).
Run:  python3 scripts/calibration_report.py [--types Q4_0 Q4_K_M Q8_0] [--variants gptq awq ...]
The table goes to stdout and the figures to W/calibration-report.json.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imatrix_report import CALIBRATION, MODEL, ROOT, TEST, run, size, table  # noqa: E402

# Each variant: the label of the table's "quantized by" column and the quantize arguments.
VARIANTS = {
    "round": ("peregrine quantize", []),
    "imatrix": ("peregrine quantize --imatrix", ["--imatrix", "{imatrix}"]),
    "gptq": ("peregrine quantize --method gptq", ["--method", "gptq", "--calibration", CALIBRATION]),
    "gptq-act-order": ("peregrine quantize --method gptq --act-order",
                       ["--method", "gptq", "--calibration", CALIBRATION, "--act-order"]),
    "gptq-imatrix": ("peregrine quantize --method gptq --act-order --imatrix",
                     ["--method", "gptq", "--calibration", CALIBRATION, "--act-order", "--imatrix", "{imatrix}"]),
    "awq": ("peregrine quantize --method awq", ["--method", "awq", "--calibration", CALIBRATION]),
    "awq-imatrix": ("peregrine quantize --method awq --imatrix", ["--method", "awq", "--calibration", CALIBRATION, "--imatrix", "{imatrix}"]),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peregrine", default=os.path.join(ROOT, ".build", "release", "peregrine"))
    ap.add_argument("--work", default=os.path.join(ROOT, ".bench-models", "imatrix"))
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q8_0"])
    ap.add_argument("--variants", nargs="+", default=["gptq", "gptq-act-order", "gptq-imatrix", "awq"], choices=sorted(VARIANTS))
    ap.add_argument("--threads", default="2")
    ap.add_argument("--report", default="calibration-report.json", help="the report's file name in the work directory")
    ap.add_argument("--table", action="store_true", help="only print the table of the last run's report")
    args = ap.parse_args()
    w = os.path.abspath(args.work)
    if args.table:
        table(json.load(open(os.path.join(w, args.report))))
        return
    p, t = os.path.abspath(args.peregrine), args.threads
    os.makedirs(w, exist_ok=True)
    bf16, base, imatrix, stats = (os.path.join(w, f) for f in ["target-bf16.gguf", "target-bf16.kld", "peregrine.imatrix.gguf",
                                                             "validation.calibration-statistics"])
    if not os.path.exists(bf16):
        run([p, "quantize", "-m", MODEL, "--type", "BF16", "-o", bf16, "-t", t])
    if not os.path.exists(imatrix):
        run([p, "imatrix", "-m", MODEL, "-f", CALIBRATION, "-o", imatrix, "-t", t])
    if not os.path.exists(base):
        run([p, "perplexity", "-m", bf16, "-f", TEST, "--kl-divergence-base", base, "--json", "-t", t])
    # The base file's own perplexity, once.
    base_json = os.path.join(w, "target-bf16.ppl.json")
    if not os.path.exists(base_json):
        out, _ = run([p, "perplexity", "-m", bf16, "-f", TEST, "--json", "-t", t])
        with open(base_json, "w") as f:
            f.write(out)
    base_ppl = json.load(open(base_json))
    rows = []
    for ty in args.types:
        for v in args.variants:
            how, extra = VARIANTS[v]
            path = os.path.join(w, f"target-{ty}-{v}.gguf")
            # One pass over the calibration text serves every type and variant (the statistics file).
            kept = ["--calibration-statistics", stats] if "--calibration" in extra else []
            qout, qerr = run([p, "quantize", "-m", MODEL, "--type", ty, "-o", path, "-t", t] + [a.format(imatrix=imatrix) for a in extra] + kept)
            out, _ = run([p, "perplexity", "-m", path, "--kl-divergence-base", base, "--kl-divergence", "--json", "-t", t])
            r = json.loads(out)
            mib, bpw = size(path)
            rows.append({"type": ty, "how": how, "file": os.path.relpath(path, ROOT), "mib": mib, "bpw": bpw,
                         "ppl": r["perplexity"], "kld": r["kl_divergence"], "kld_percentiles": r["kl_divergence_percentiles"],
                         "same_top_p": r["same_top_p"], "ppl_ratio": r["perplexity_ratio"], "quantize_log": (qerr + qout)[-2000:]})
            with open(os.path.join(w, args.report), "w") as f:
                mib0, bpw0 = size(bf16)
                json.dump({"base": {"file": os.path.relpath(bf16, ROOT), "mib": mib0, "bpw": bpw0, "ppl": base_ppl}, "rows": rows}, f, indent=1)
    table(json.load(open(os.path.join(w, args.report))))


if __name__ == "__main__":
    main()
