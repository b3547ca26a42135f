#!/usr/bin/env python3
"""Peregrine's CUDA backend beside transformers on the same GPU, model and dtype (BF16): pp512 and
tg128 tokens/s for Peregrine, transformers eager, and transformers with a static cache and
torch.compile; and the fraction of HBM bandwidth Peregrine's decode reaches: bytes of weights
read per token x tokens/s, against a device-to-device copy measured in the same run.

Run on the GPU machine through scripts/gpu_bench.sh.
"""
import argparse
import json
import statistics
import subprocess
import time

import torch


def copy_bandwidth():
    """Bytes read plus bytes written per second by a 4 GiB device-to-device copy (median of 10)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    times = []
    for i in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 4 * n / statistics.median(times)


def peregrine(binary, model, pp, tg, reps):
    out = subprocess.run([binary, "bench", "-m", model, "--device", "cuda", "-p", str(pp), "-n", str(tg), "-r", str(reps),
                          "--json"], check=True, capture_output=True, text=True).stdout
    rows = [json.loads(l) for l in out.strip().splitlines()]
    pp_row = next(r for r in rows if r["test"].startswith("pp"))
    tg_row = next(r for r in rows if r["test"].startswith("tg"))
    return pp_row["tokens_per_second"], tg_row["tokens_per_second"], tg_row["decode_bytes_per_token"], pp_row["load_seconds"]


def transformers_speed(model_dir, pp, tg, reps, compiled):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, pp), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    if compiled:
        # A static cache makes generate compile the decoding step (torch.compile, CUDA graphs).
        model.generation_config.cache_implementation = "static"

    def generate(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up (and compilation)
        generate(tg)
        generate(1)
    prefill = statistics.median(generate(1) for _ in range(reps))
    full = statistics.median(generate(tg + 1) for _ in range(reps))
    del model
    torch.cuda.empty_cache()
    return pp / prefill, tg / (full - prefill)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bandwidth / 1e12:.2f} TB/s (read + written)", flush=True)
    rows = []
    pp, tg, bytes_per_token, load = peregrine(args.binary, args.model, args.pp, args.tg, args.reps)
    rows.append(("Peregrine (CUDA)", pp, tg))
    print(f"Peregrine: pp{args.pp} {pp:.1f} t/s, tg{args.tg} {tg:.2f} t/s, load {load:.1f} s, "
          f"{bytes_per_token / 1e9:.2f} GB read per token", flush=True)
    e_pp, e_tg = transformers_speed(args.model, args.pp, args.tg, args.reps, compiled=False)
    rows.append(("transformers eager", e_pp, e_tg))
    print(f"transformers eager: pp {e_pp:.1f}, tg {e_tg:.2f}", flush=True)
    if not args.skip_compile:
        c_pp, c_tg = transformers_speed(args.model, args.pp, args.tg, args.reps, compiled=True)
        rows.append(("transformers static cache + torch.compile", c_pp, c_tg))
        print(f"transformers compiled: pp {c_pp:.1f}, tg {c_tg:.2f}", flush=True)
    print()
    print(f"| engine | pp{args.pp} t/s | tg{args.tg} t/s | Peregrine tg / this |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.1f} | {b:.2f} | {tg / b:.2f}x |")
    achieved = bytes_per_token * tg
    # A copy reads and writes at once; its bytes moved per second (read + written) are the HBM
    # rate reached in this run, which a decode step (almost all reads) is measured against.
    print(f"\nPeregrine decode: {bytes_per_token / 1e9:.2f} GB/token x {tg:.2f} t/s = {achieved / 1e12:.2f} TB/s read = "
          f"{100 * achieved / bandwidth:.0f}% of the copy's rate ({bandwidth / 1e12:.2f} TB/s read + written)")


if __name__ == "__main__":
    main()
