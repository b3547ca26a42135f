#!/usr/bin/env python3
"""Makes the fixtures of the importance-matrix and KL-divergence tests (Tests/Fixtures/imatrix)
and checks that llama.cpp reads the files Peregrine writes:

- llama.transformers.json: for the tiny Llama (Tests/Fixtures/models/llama), the sum of the
  squared inputs of each of transformers' q/k/v/o and gate/up/down projections over
  Tests/Fixtures/gguf/perplexity.txt cut as llama-imatrix cuts it (chunks of 128 tokens, the
  first of each replaced by BOS), with the rows counted: the reference pass.
- llama-f32.imatrix.gguf, llama-f32.imatrix.dat, llama256-f16.imatrix.gguf,
  mixtral-f32.imatrix.gguf: llama.cpp's llama-imatrix on the GGUF fixtures over the same text
  (both of its formats; the Mixtral file's stacked experts counted per expert).
- llama256-weighted.json: llama256-f16.gguf quantized by llama-quantize --pure --imatrix (the
  llama256 matrix above) to each type, and the importance-weighted squared error of each layer
  matrix (weights dequantized by gguf-py against the F16 source).
- llama-f32.kld and kl-divergence.json: llama-perplexity --kl-divergence-base on llama-f32.gguf
  (3 chunks of 128), and llama-perplexity --kl-divergence's statistics for llama-q8_0.gguf against
  that file and against the same file written by `peregrine perplexity --kl-divergence-base`.

It also runs llama-quantize --imatrix on matrices `peregrine imatrix` wrote (GGUF and legacy)
and fails if llama.cpp does not load all their entries.

Needs: a release build of Peregrine (swift build -c release); llama.cpp's llama-imatrix,
llama-quantize and llama-perplexity, from a CPU build of llama.cpp's sources:
  cmake -S LLAMA_CPP -B LLAMA_CPP/build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
  cmake --build LLAMA_CPP/build --target llama-imatrix llama-quantize llama-perplexity
and Python with torch, transformers, numpy and gguf (llama.cpp's gguf-py).
Run:  python3 scripts/make_imatrix_fixture.py --llama-bin LLAMA_CPP/build/bin [--peregrine PATH]
(--only transformers makes the transformers reference alone; --only weighted, llama256-weighted.json
alone, from the committed matrix.)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
FIXTURES = os.path.join(ROOT, "Tests", "Fixtures")
GGUF_DIR = os.path.join(FIXTURES, "gguf")
OUT = os.path.join(FIXTURES, "imatrix")
TEXT = os.path.join(GGUF_DIR, "perplexity.txt")
CTX = 128
PEREGRINE = os.path.join(ROOT, ".build", "release", "peregrine")
# llama.cpp's f32 attention: an f32 KV cache, and no flash attention (its CPU kernel rounds to
# f16 inside, which moves these models' log-probabilities by up to 0.02).
EXACT = ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]

# Hugging Face projection -> llama.cpp tensor name inside a layer.
PROJECTIONS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
# llama-quantize type names, and the tensor type each gives every layer matrix with --pure.
TYPES = {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
         "Q4_K_S": "Q4_K", "Q5_K_S": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
         "Q3_K_S": "Q3_K", "Q2_K": "Q2_K"}


def run(cmd, **kw):
    # Output through files: llama.cpp's tools lose the end of what they print into a pipe.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        r = subprocess.run(cmd, stdout=out, stderr=err, text=True, **kw)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return stdout + stderr


def transformers_sums():
    import tokenizers
    import torch
    import transformers
    path = os.path.join(FIXTURES, "models", "llama")
    tok = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    config = json.load(open(os.path.join(path, "config.json")))
    ids = tok.encode(open(TEXT, encoding="utf-8").read()).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sums, counts = {}, {}

    def hook(name):
        def f(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    for i, layer in enumerate(model.model.layers):
        for hf, g in PROJECTIONS.items():
            module = layer.get_submodule(hf)
            module.register_forward_pre_hook(hook(f"blk.{i}.{g}.weight"))
    chunks = len(ids) // CTX
    with torch.no_grad():
        for c in range(chunks):
            chunk = ids[c * CTX:(c + 1) * CTX]
            chunk[0] = config["bos_token_id"]
            model(torch.tensor([chunk]))
    entries = {n: {"count": counts[n], "sums": [float(v) for v in sums[n]]} for n in sorted(sums)}
    with open(os.path.join(OUT, "llama.transformers.json"), "w") as f:
        json.dump({"model": "models/llama", "text": "gguf/perplexity.txt", "ctx": CTX, "chunks": chunks,
                   "entries": entries}, f, indent=0)
    print("transformers:", len(entries), "entries over", chunks, "chunks")


def llama_imatrix(tool, model, out, extra=()):
    return run([tool("llama-imatrix"), "-m", model, "-f", TEXT, "-c", str(CTX), "-o", out, "-t", "2", *EXACT, *extra])


def read_imatrix_means(path):
    from gguf import GGUFReader
    r = GGUFReader(path)
    t = {x.name: np.array(x.data, dtype=np.float64) for x in r.tensors}
    means = {}
    for name in t:
        if name.endswith(".in_sum2"):
            base = name[:-len(".in_sum2")]
            means[base] = (t[name].reshape(-1) / t[base + ".counts"].reshape(-1)[0])
    return means


def tensors_as_float(path):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type).reshape(-1, int(t.shape[0]))) for t in r.tensors}


def weighted_errors(tool, matrix):
    source = os.path.join(GGUF_DIR, "llama256-f16.gguf")
    means = read_imatrix_means(matrix)
    reference = tensors_as_float(source)
    errors = {}
    with tempfile.TemporaryDirectory() as d:
        for ftype, tensor_type in TYPES.items():
            out = os.path.join(d, f"{ftype}.gguf")
            run([tool("llama-quantize"), "--pure", "--imatrix", matrix, source, out, ftype])
            q = tensors_as_float(out)
            errors[tensor_type] = {}
            for name, imp in means.items():
                kind, w = q[name]
                assert kind == tensor_type, (name, kind, tensor_type)
                x = reference[name][1].astype(np.float64)
                errors[tensor_type][name] = float(((x - w.astype(np.float64)) ** 2 * imp[None, :]).sum())
            print(ftype, "weighted error", sum(errors[tensor_type].values()))
    with open(os.path.join(OUT, "llama256-weighted.json"), "w") as f:
        json.dump({"source": "gguf/llama256-f16.gguf", "imatrix": "imatrix/llama256-f16.imatrix.gguf",
                   "command": "llama-quantize --pure --imatrix", "weighted_error": errors}, f, indent=1)


def llama_cpp_loads_ours(tool):
    """llama-quantize --imatrix on matrices Peregrine wrote, in both formats."""
    source = os.path.join(GGUF_DIR, "llama256-f16.gguf")
    with tempfile.TemporaryDirectory() as d:
        for fmt in ["gguf", "dat"]:
            m = os.path.join(d, f"ours.{fmt}")
            run([PEREGRINE, "imatrix", "-m", source, "-f", TEXT, "-c", str(CTX), "-o", m, "--output-format", fmt])
            log = run([tool("llama-quantize"), "--imatrix", m, source, os.path.join(d, "q.gguf"), "Q4_K_M"])
            found = re.search(r"loaded (\d+) importance matrix entries", log)
            missing = [n for n in re.findall(r"did not find weights for (\S+)", log) if n.startswith("blk.")]
            if not found or found.group(1) != "14" or missing:
                sys.exit(f"llama-quantize did not use Peregrine's {fmt} matrix:\n{log[-3000:]}")
            print(f"llama-quantize loaded Peregrine's {fmt} matrix:", found.group(0))


def kl_statistics(log):
    def value(label):
        m = re.search(re.escape(label) + r"\s*:\s*([-0-9.]+)", log)
        if not m:
            sys.exit(f"no '{label}' in llama-perplexity's output:\n{log[-3000:]}")
        return float(m.group(1))
    return {"ppl": value("Mean PPL(Q)"), "base_ppl": value("Mean PPL(base)"), "mean_kld": value("Mean    KLD"),
            "same_top_p": value("Same top p")}


def kl_divergence(tool):
    base = os.path.join(OUT, "llama-f32.kld")
    common = ["-c", str(CTX), "-b", str(CTX), "-t", "2", *EXACT]
    run([tool("llama-perplexity"), "-m", os.path.join(GGUF_DIR, "llama-f32.gguf"), "-f", TEXT, "--chunks", "3",
         "--kl-divergence-base", base, *common])
    quantized = os.path.join(GGUF_DIR, "llama-q8_0.gguf")
    results = {"llama.cpp base": kl_statistics(run([tool("llama-perplexity"), "-m", quantized, "--kl-divergence-base", base,
                                                     "--kl-divergence", *common]))}
    with tempfile.TemporaryDirectory() as d:
        ours = os.path.join(d, "ours.kld")
        run([PEREGRINE, "perplexity", "-m", os.path.join(GGUF_DIR, "llama-f32.gguf"), "-f", TEXT, "-c", str(CTX), "--chunks", "3",
             "--kl-divergence-base", ours])
        results["peregrine base"] = kl_statistics(run([tool("llama-perplexity"), "-m", quantized, "--kl-divergence-base", ours,
                                                       "--kl-divergence", *common]))
    print(results)
    with open(os.path.join(OUT, "kl-divergence.json"), "w") as f:
        json.dump({"model": "gguf/llama-q8_0.gguf", "base_model": "gguf/llama-f32.gguf", "ctx": CTX, "chunks": 3,
                   "command": "llama-perplexity --kl-divergence", **results}, f, indent=1)


def main():
    global PEREGRINE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin", required=False, help="directory of llama.cpp's llama-imatrix, llama-quantize, llama-perplexity")
    ap.add_argument("--peregrine", default=PEREGRINE, help="the peregrine executable (default: the release build)")
    ap.add_argument("--only", choices=["transformers", "weighted"],
                    help="make only the transformers reference (needs no llama.cpp), or only llama256-weighted.json "
                         "(from the committed llama256-f16.imatrix.gguf; needs llama-quantize, not Peregrine)")
    args = ap.parse_args()
    PEREGRINE = os.path.abspath(args.peregrine)
    if args.only == "transformers":
        os.makedirs(OUT, exist_ok=True)
        transformers_sums()
        return
    if not args.llama_bin:
        ap.error("--llama-bin is required")
    os.makedirs(OUT, exist_ok=True)
    env_bin = os.path.abspath(args.llama_bin)
    os.environ["LD_LIBRARY_PATH"] = env_bin + os.pathsep + os.environ.get("LD_LIBRARY_PATH", "")

    def tool(name):
        path = os.path.join(env_bin, name)
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: build it (cmake --build ... --target {name})")
        return path

    if args.only == "weighted":
        weighted_errors(tool, os.path.join(OUT, "llama256-f16.imatrix.gguf"))
        return
    if not os.path.exists(PEREGRINE):
        sys.exit(f"{PEREGRINE} is missing: swift build -c release")
    transformers_sums()
    f32 = os.path.join(GGUF_DIR, "llama-f32.gguf")
    llama_imatrix(tool, f32, os.path.join(OUT, "llama-f32.imatrix.gguf"))
    llama_imatrix(tool, f32, os.path.join(OUT, "llama-f32.imatrix.dat"), ["--output-format", "dat"])
    llama256 = os.path.join(OUT, "llama256-f16.imatrix.gguf")
    llama_imatrix(tool, os.path.join(GGUF_DIR, "llama256-f16.gguf"), llama256)
    weighted_errors(tool, llama256)
    llama_imatrix(tool, os.path.join(GGUF_DIR, "mixtral-f32.gguf"), os.path.join(OUT, "mixtral-f32.imatrix.gguf"))
    llama_cpp_loads_ours(tool)
    kl_divergence(tool)


if __name__ == "__main__":
    main()
