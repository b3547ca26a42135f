#!/usr/bin/env python3
"""Peregrine beside llama.cpp on the CPU: the same models, the same precision (F16), the same
thread count, measured in one run, alternating, with medians and ratios.

llama.cpp comes from PyPI's llama-cpp-python, which builds it from source for this machine; its
sdist also carries llama.cpp's convert_hf_to_gguf.py, used here to make the GGUF files.

Setup (once):
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install llama-cpp-python torch transformers tokenizers safetensors numpy sentencepiece
  .venv-bench/bin/python scripts/make_bench_models.py          # .bench-models/*
  swift build -c release
Run:
  .venv-bench/bin/python scripts/compare_llamacpp.py [--rounds 5] [--threads 2] [--models target-f16 ...]

Each round runs Peregrine's `bench --json -r 1` and llama.cpp's equivalent (one warm-up, then
pp512 as one batch of 512 tokens into an empty cache and tg128 as 128 single-token decodes) as
separate processes, in alternating order. The table gives the median over rounds.
"""
import argparse
import glob
import importlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BENCH_MODELS = os.path.join(ROOT, ".bench-models")
PRE_TOKENIZER = {"target-f16": "llama-bpe", "llama-1b-shape": "llama-bpe", "qwen2.5-0.5b-shape": "qwen2",
                 "qwen3-moe-small-shape": "qwen2"}


def llama_cpp_sources():
    """llama.cpp's converter from the llama-cpp-python sdist of the installed version."""
    import llama_cpp
    cache = os.path.join(ROOT, ".bench-models", f"llama-cpp-python-{llama_cpp.__version__}")
    if not os.path.isdir(cache):
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", "-q",
                            f"llama-cpp-python=={llama_cpp.__version__}", "-d", d], check=True)
            sdist = glob.glob(os.path.join(d, "*.tar.gz"))[0]
            with tarfile.open(sdist) as t:
                t.extractall(cache, filter="data")
    return glob.glob(os.path.join(cache, "*", "vendor", "llama.cpp"))[0]


def llama_cpp_tool(name):
    """A llama.cpp command-line tool (llama-perplexity, llama-quantize) built from the same
    sdist's sources with CMake (pip's cmake and ninja), once, into .bench-models/llama-build."""
    build = os.path.join(BENCH_MODELS, "llama-build")
    exe = os.path.join(build, "bin", name)
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
        bindir = os.path.dirname(sys.executable)
        env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
        subprocess.run(["cmake", llama_cpp_sources(), "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True, env=env)
        subprocess.run(["ninja", "-C", build, name], check=True, env=env)
    return exe


def convert(model_dir, out, pre):
    """HF -> GGUF F16 with llama.cpp's converter. The reference and random models use tokenizers
    trained here, which the converter does not know by hash; we tell it which pre-tokenizer they use."""
    if os.path.exists(out):
        return out
    src = llama_cpp_sources()
    code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {model_dir!r}, '--outtype', 'f16', '--outfile', {out!r}]
import convert_hf_to_gguf as c
try:
    from conversion.base import TextModel as base
except ImportError:
    base = getattr(c, 'TextModel', None) or getattr(c, 'Model')
base.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
c.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
    return out


LLAMA_RUNNER = r"""
import json, random, sys, time
from llama_cpp import Llama
path, threads, pp, tg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t0 = time.time()
llm = Llama(model_path=path, n_ctx=max(pp, tg) + 16, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False)
load = time.time() - t0
vocab = llm.n_vocab()
random.seed(1)
prompt = [random.randrange(vocab) for _ in range(pp)]
def run_pp():
    llm.reset(); t = time.perf_counter(); llm.eval(prompt); return time.perf_counter() - t
def run_tg():
    llm.reset(); t = time.perf_counter()
    for i in range(tg):
        llm.eval([1 if i == 0 else (i * 7919) % vocab])
    return time.perf_counter() - t
run_pp(); run_tg()  # warm-up
print(json.dumps({"pp": pp / run_pp(), "tg": tg / run_tg(), "load": load}))
"""


def run_llama(gguf, threads, pp, tg):
    out = subprocess.run([sys.executable, "-c", LLAMA_RUNNER, gguf, str(threads), str(pp), str(tg)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_peregrine(model_dir, threads, pp, tg):
    out = subprocess.run([os.path.join(ROOT, ".build", "release", "peregrine"), "bench", "-m", model_dir, "-p", str(pp),
                          "-n", str(tg), "-t", str(threads), "-r", "1", "--json"],
                         check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.strip().splitlines():
        row = json.loads(line)
        res["pp" if row["test"].startswith("pp") else "tg"] = row["tokens_per_second"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--models", nargs="*", default=["target-f16", "qwen2.5-0.5b-shape", "llama-1b-shape"])
    args = ap.parse_args()
    import llama_cpp
    print(f"llama-cpp-python {llama_cpp.__version__}; threads {args.threads}; rounds {args.rounds}; "
          f"pp{args.pp} tg{args.tg}", flush=True)
    rows = []
    for name in args.models:
        model_dir = os.path.join(BENCH_MODELS, name)
        gguf = convert(model_dir, os.path.join(BENCH_MODELS, f"{name}.f16.gguf"), PRE_TOKENIZER[name])
        ours, theirs = {"pp": [], "tg": []}, {"pp": [], "tg": []}
        for r in range(args.rounds):
            order = [("peregrine", run_peregrine, model_dir, ours), ("llama.cpp", run_llama, gguf, theirs)]
            if r % 2:
                order.reverse()
            for who, fn, path, acc in order:
                res = fn(path, args.threads, args.pp, args.tg)
                acc["pp"].append(res["pp"])
                acc["tg"].append(res["tg"])
                print(f"  {name} round {r + 1} {who}: pp {res['pp']:.1f} t/s, tg {res['tg']:.2f} t/s", flush=True)
        for test, n in (("pp", args.pp), ("tg", args.tg)):
            a, b = statistics.median(ours[test]), statistics.median(theirs[test])
            rows.append((name, f"{test}{n}", a, b, a / b, ours[test], theirs[test]))
    print()
    print(f"| model (F16, {args.threads} threads) | test | Peregrine t/s | llama.cpp t/s | ratio |")
    print("|---|---|---|---|---|")
    for name, test, a, b, ratio, _, _ in rows:
        print(f"| {name} | {test} | {a:.2f} | {b:.2f} | {ratio:.2f}x |")
    with open(os.path.join(BENCH_MODELS, "compare_llamacpp.json"), "w") as f:
        json.dump([dict(model=r[0], test=r[1], peregrine=r[5], llama_cpp=r[6]) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
