#!/usr/bin/env python3
"""Makes the GGUF fixtures: the tiny Llama test model (Tests/Fixtures/models/llama) converted to
GGUF F32 and Q8_0 by llama.cpp's own convert_hf_to_gguf.py (and to Q4_0 by its quantizer), what llama.cpp's gguf-py reader sees
in the F32 file (metadata, tensor names, shapes, types, offsets), and llama.cpp's logits on both
files, for the Swift reader and engine to match; and a random Llama with 256-wide rows
quantized by llama.cpp to Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M and Q6_K, with llama.cpp's logits.

Run with the interpreter of scripts/compare_llamacpp.py (llama-cpp-python installed, torch and
transformers available):  .venv-bench/bin/python scripts/make_gguf_fixture.py

The Phi-3 fixtures (phi4-f32, phi3-partial-f32, phi3.5-longrope-f32: the tiny Phi3ForCausalLM
models of Tests/Fixtures/models converted by llama.cpp's converter, and llama.cpp's logits on them)
come from a llama.cpp source tree and its build (cmake -B build && cmake --build build), through
scripts/llamacpp_logits.c, compiled here against llama.h and libllama:
  LLAMA_CPP_DIR=/path/to/llama.cpp LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin \
    python3 scripts/make_gguf_fixture.py --phi3-only
(needs torch, numpy, sentencepiece and a C compiler; the converter's gguf-py comes from the tree).
--moe-only makes the mixture-of-experts fixtures: the tiny Mixtral, Qwen2-MoE and Qwen3-MoE models
of Tests/Fixtures/models (scripts/make_fixtures.py) converted to F32 by llama.cpp's converter,
Mixtral also quantized by llama-quantize to Q8_0 and Q4_0, and llama.cpp's logits on each, and on
the Q4_0 file `peregrine quantize` writes from the Mixtral directory. It needs a llama.cpp
checkout and its CPU build (libllama and llama-quantize), not llama-cpp-python:
  git clone https://github.com/ggml-org/llama.cpp && cmake -S llama.cpp -B llama.cpp/build && cmake --build llama.cpp/build
  swift build
  LLAMA_CPP_DIR=llama.cpp LLAMA_CPP_BIN=llama.cpp/build/bin python3 scripts/make_gguf_fixture.py --moe-only
(the Python needs torch, numpy and sentencepiece for the converter; scripts/llamacpp_logits.c,
compiled here with cc, reads the logits).
--iq4-only makes the IQ4 fixtures: the 256-wide random Llama (llama256-f16.gguf, above) quantized by
llama-quantize to IQ4_NL and IQ4_XS (committed) and by `peregrine quantize` to the same types, and
llama.cpp's logits on all four files. Like --moe-only it needs a llama.cpp checkout and its CPU
build, and a Peregrine build (PEREGRINE=path/to/peregrine, default .build/debug/peregrine):
  swift build
  LLAMA_CPP_DIR=llama.cpp LLAMA_CPP_BIN=llama.cpp/build/bin python3 scripts/make_gguf_fixture.py --iq4-only

--low-k-only makes the Q2_K and Q3_K fixtures: the 256-wide random Llama (llama256-f16.gguf, made
above) quantized by llama-quantize to Q2_K and Q3_K_M, llama.cpp's logits on both and on the files
`peregrine quantize` writes for the same mixes, and the tensor types llama-quantize gives for Q2_K,
Q3_K_S, Q3_K_M and Q3_K_L (llama256-low-k-types.json). It needs a llama.cpp checkout and its CPU
build, and a Peregrine build (`swift build`; PEREGRINE=path/to/peregrine to use another):
  LLAMA_CPP_DIR=llama.cpp LLAMA_CPP_BIN=llama.cpp/build/bin python3 scripts/make_gguf_fixture.py --low-k-only
(the Python needs numpy; llama.cpp's gguf-py comes from the checkout).
The Gemma fixtures (the tiny Gemma 2 and Gemma 3 of Tests/Fixtures/models converted by llama.cpp's
converter to F32, Gemma 3 to Q8_0 too, and llama.cpp's logits on each) come from a llama.cpp
checkout built with shared libraries (cmake -B build -DBUILD_SHARED_LIBS=ON && cmake --build build),
its logits read through scripts/llamacpp_logits.c, compiled here with the system C compiler:
  LLAMA_CPP_DIR=/path/to/llama.cpp LLAMA_CPP_BIN=/path/to/llama.cpp/build/bin \
      python3 scripts/make_gguf_fixture.py --gemma-only   (torch, numpy, sentencepiece, safetensors)
"""
import json
import os
import subprocess
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_llamacpp import convert, llama_cpp_sources, llama_cpp_tool  # noqa: E402

OUT = os.path.join(ROOT, "Tests", "Fixtures", "gguf")


def convert_fixture(src, outtype):
    path = os.path.join(OUT, f"llama-{outtype}.gguf")
    if os.path.exists(path):
        os.remove(path)
    code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {os.path.join(ROOT, 'Tests', 'Fixtures', 'models', 'llama')!r}, '--outtype', {outtype!r}, '--outfile', {path!r}]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'
c.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
    return path


def record_llama_cpp_logits(path, name, reference="llama"):
    """llama.cpp's logits on a fixture's prompt and greedy continuation (F32 KV cache)."""
    import numpy as np
    from llama_cpp import Llama
    ref = json.load(open(os.path.join(ROOT, "Tests", "Fixtures", "models", reference, "reference.json")))
    seq = ref["prompt_ids"] + ref["greedy_ids"]
    llm = Llama(model_path=path, n_ctx=128, n_batch=128, logits_all=True, verbose=False, type_k=0, type_v=0, n_threads=2)
    llm.eval(seq)
    np.array(llm.scores[:len(seq)], dtype="<f4").tofile(os.path.join(OUT, f"{name}.llamacpp_logits.bin"))
    print(name, "llama.cpp logits for", len(seq), "positions")


# llama.cpp file types of the quantized fixtures, and the GGUF tensor types each exercises.
QUANT_FIXTURES = {"q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def make_kquant_fixture(src):
    """A random Llama whose rows are multiples of 256 values (the k-quants' block), with the tiny
    fixture's tokenizer: converted to F16 by llama.cpp's converter, then quantized by llama.cpp
    into each type of QUANT_FIXTURES. All the files and llama.cpp's logits on them are committed
    (the F16 one is also the source `peregrine quantize` is tested on)."""
    import ctypes
    import shutil
    import tempfile
    import torch
    import transformers
    import llama_cpp
    tiny = os.path.join(ROOT, "Tests", "Fixtures", "models", "llama")
    with tempfile.TemporaryDirectory() as d:
        cfg = transformers.LlamaConfig(vocab_size=403, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                                       initializer_range=0.08, tie_word_embeddings=False, bos_token_id=400,
                                       eos_token_id=401)
        torch.manual_seed(256)
        model = transformers.LlamaForCausalLM(cfg).float()
        model.save_pretrained(d, safe_serialization=True)
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tiny, f), d)
        f16 = os.path.join(OUT, "llama256-f16.gguf")
        code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {d!r}, '--outtype', 'f16', '--outfile', {f16!r}]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'
c.main()
"""
        subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
        record_llama_cpp_logits(f16, "llama256-f16")
        for name, ftype in QUANT_FIXTURES.items():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            out = os.path.join(OUT, f"llama256-{name}.gguf")
            assert llama_cpp.llama_model_quantize(f16.encode(), out.encode(), ctypes.byref(params)) == 0
            record_llama_cpp_logits(out, f"llama256-{name}")


def record_perplexity():
    """llama-perplexity's estimates on perplexity.txt (chunks of 128) for some fixture files."""
    import re
    exe = llama_cpp_tool("llama-perplexity")
    text = os.path.join(OUT, "perplexity.txt")
    results = {}
    for name in ["llama-f32", "llama-q8_0", "llama256-q4_k_m", "llama256-q6_k"]:
        out = subprocess.run([exe, "-m", os.path.join(OUT, f"{name}.gguf"), "-f", text, "-c", "128", "-b", "128",
                              "-t", "2", "-ctk", "f32", "-ctv", "f32"], capture_output=True, text=True, check=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
        results[name] = {"perplexity": float(m.group(1)), "uncertainty": float(m.group(2))}
        print(name, results[name])
    with open(os.path.join(OUT, "perplexity.json"), "w") as f:
        json.dump({"ctx": 128, "file": "perplexity.txt", "llama.cpp": results}, f, indent=1)


def record_peregrine_quantized():
    """llama.cpp's logits on files written by `peregrine quantize` (built first with
    `swift build -c release`): the 256-wide model's F16 GGUF to Q4_K_M, the tiny Hugging Face
    fixture directory to Q8_0, and the SentencePiece-tokenizer fixture (llama2) to F16. The Swift tests quantize the same sources again and must
    match these."""
    import tempfile
    exe = os.path.join(ROOT, ".build", "release", "peregrine")
    models = os.path.join(ROOT, "Tests", "Fixtures", "models")
    jobs = [(os.path.join(OUT, "llama256-f16.gguf"), "Q4_K_M", "peregrine-llama256-q4_k_m", "llama"),
            (os.path.join(models, "llama"), "Q8_0", "peregrine-llama-q8_0", "llama"),
            (os.path.join(models, "llama2"), "F16", "peregrine-llama2-f16", "llama2")]
    with tempfile.TemporaryDirectory() as d:
        for source, mix, name, reference in jobs:
            path = os.path.join(d, name + ".gguf")
            subprocess.run([exe, "quantize", "-m", source, "--type", mix, "-o", path], check=True, capture_output=True)
            record_llama_cpp_logits(path, name, reference=reference)


PHI3_FIXTURES = ["phi4", "phi3-partial", "phi3.5-longrope"]


def make_phi3_fixtures():
    """Each Phi-3 fixture model converted to F32 GGUF by the converter of LLAMA_CPP_DIR (fused
    attn_qkv and ffn_up; rope_factors_long/short for LongRoPE; rope.dimension_count for partial
    rotary), and llama.cpp's logits for its prompt and greedy continuation in one batch, with a
    context of 128 (longer than LongRoPE's original 64, so llama.cpp takes the long factors, as a
    pass over the whole sequence does)."""
    import tempfile
    src, libdir = llama_cpp_checkout()
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "llamacpp_logits")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "llamacpp_logits.c"),
                        "-I", os.path.join(src, "include"), "-I", os.path.join(src, "ggml", "include"),
                        "-L", libdir, "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{libdir}"], check=True)
        for name in PHI3_FIXTURES:
            model_dir = os.path.join(ROOT, "Tests", "Fixtures", "models", name)
            path = os.path.join(OUT, f"{name}-f32.gguf")
            if os.path.exists(path):
                os.remove(path)
            # llama.cpp gives the special tokens of a model whose general.name contains "phi3" or
            # "phi-3" the attributes of Phi-3's own vocabulary, which requires its "</s>"; the
            # fixtures use another vocabulary, so their names avoid that spelling.
            title = "tiny " + name.replace("phi3", "phi 3")
            code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {model_dir!r}, '--outtype', 'f32', '--outfile', {path!r}, '--model-name', {title!r}]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: 'llama-bpe'
c.main()
"""
            subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
            ref = json.load(open(os.path.join(model_dir, "reference.json")))
            seq = ref["prompt_ids"] + ref["greedy_ids"]
            out = os.path.join(OUT, f"{name}-f32.llamacpp_logits.bin")
            subprocess.run([exe, path, out, ",".join(str(t) for t in seq)], check=True)
            print(name, os.path.getsize(path), "bytes; llama.cpp logits for", len(seq), "positions")


def llama_cpp_checkout():
    src, bindir = os.environ.get("LLAMA_CPP_DIR"), os.environ.get("LLAMA_CPP_BIN")
    if not src or not bindir:
        sys.exit("needs LLAMA_CPP_DIR (a llama.cpp checkout) and LLAMA_CPP_BIN (its build's bin directory)")
    return os.path.abspath(src), os.path.abspath(bindir)


def convert_model(src, model_dir, outtype, path, pre):
    """A Hugging Face directory to GGUF with llama.cpp's converter; our tokenizers are not known
    to it by hash, so it is told which pre-tokenizer they use."""
    if os.path.exists(path):
        os.remove(path)
    code = f"""
import sys
sys.path.insert(0, {os.path.join(src, 'gguf-py')!r}); sys.path.insert(0, {src!r})
sys.argv = ['convert_hf_to_gguf.py', {model_dir!r}, '--outtype', {outtype!r}, '--outfile', {path!r}]
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: {pre!r}
c.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
    return path


def make_moe_fixtures():
    import tempfile
    src, bindir = llama_cpp_checkout()
    models = os.path.join(ROOT, "Tests", "Fixtures", "models")
    env = dict(os.environ, LD_LIBRARY_PATH=bindir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    with tempfile.TemporaryDirectory() as d:
        tool = os.path.join(d, "llamacpp_logits")
        subprocess.run(["cc", "-O2", os.path.join(ROOT, "scripts", "llamacpp_logits.c"), "-I", os.path.join(src, "include"),
                        "-I", os.path.join(src, "ggml", "include"), "-L", bindir, "-lllama", "-Wl,-rpath," + bindir, "-o", tool],
                       check=True)

        def logits(path, name, reference):
            ref = json.load(open(os.path.join(models, reference, "reference.json")))
            seq = ref["prompt_ids"] + ref["greedy_ids"]
            out = os.path.join(OUT, f"{name}.llamacpp_logits.bin")
            subprocess.run([tool, path, out, ",".join(str(t) for t in seq)], check=True, env=env, capture_output=True)
            print(name, "llama.cpp logits for", len(seq), "positions,", os.path.getsize(path), "bytes of GGUF")

        for name, pre in [("mixtral", "llama-bpe"), ("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen2")]:
            path = convert_model(src, os.path.join(models, name), "f32", os.path.join(OUT, f"{name}-f32.gguf"), pre)
            logits(path, f"{name}-f32", name)
        for mix in ["Q8_0", "Q4_0"]:
            path = os.path.join(OUT, f"mixtral-{mix.lower()}.gguf")
            subprocess.run([os.path.join(bindir, "llama-quantize"), os.path.join(OUT, "mixtral-f32.gguf"), path, mix],
                           check=True, env=env, capture_output=True)
            logits(path, f"mixtral-{mix.lower()}", "mixtral")
        exe = os.environ.get("PEREGRINE") or os.path.join(ROOT, ".build", "debug", "peregrine")
        path = os.path.join(d, "peregrine-mixtral-q4_0.gguf")
        subprocess.run([exe, "quantize", "-m", os.path.join(models, "mixtral"), "--type", "Q4_0", "-o", path], check=True,
                       capture_output=True)
        logits(path, "peregrine-mixtral-q4_0", "mixtral")


def make_iq4_fixtures():
    """llama256-f16.gguf to IQ4_NL and IQ4_XS by llama-quantize (no importance matrix) and by
    `peregrine quantize`, with llama.cpp's logits on each (the Peregrine files themselves are not
    kept: the tests write them again, and their IQ4 tensors must equal llama.cpp's byte for byte)."""
    import tempfile
    src, bindir = llama_cpp_checkout()
    env = dict(os.environ, LD_LIBRARY_PATH=bindir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    source = os.path.join(OUT, "llama256-f16.gguf")
    exe = os.environ.get("PEREGRINE") or os.path.join(ROOT, ".build", "debug", "peregrine")
    ref = json.load(open(os.path.join(ROOT, "Tests", "Fixtures", "models", "llama", "reference.json")))
    ids = ",".join(str(t) for t in ref["prompt_ids"] + ref["greedy_ids"])
    with tempfile.TemporaryDirectory() as d:
        tool = os.path.join(d, "llamacpp_logits")
        subprocess.run(["cc", "-O2", os.path.join(ROOT, "scripts", "llamacpp_logits.c"), "-I", os.path.join(src, "include"),
                        "-I", os.path.join(src, "ggml", "include"), "-L", bindir, "-lllama", "-Wl,-rpath," + bindir, "-o", tool],
                       check=True)
        for mix in ["IQ4_NL", "IQ4_XS"]:
            theirs = os.path.join(OUT, f"llama256-{mix.lower()}.gguf")
            subprocess.run([os.path.join(bindir, "llama-quantize"), source, theirs, mix], check=True, env=env, capture_output=True)
            ours = os.path.join(d, f"peregrine-llama256-{mix.lower()}.gguf")
            subprocess.run([exe, "quantize", "-m", source, "--type", mix, "-o", ours], check=True, capture_output=True)
            for path in [theirs, ours]:
                name = os.path.basename(path)[:-len(".gguf")]
                subprocess.run([tool, path, os.path.join(OUT, f"{name}.llamacpp_logits.bin"), ids], check=True, env=env,
                               capture_output=True)
                print(name, os.path.getsize(path), "bytes; llama.cpp logits")


# llama-quantize file types of the Q2_K/Q3_K fixtures; the files of the first two are committed.
LOW_K_MIXES = ["Q2_K", "Q3_K_M", "Q3_K_S", "Q3_K_L"]


def make_low_k_fixtures():
    import tempfile
    src, bindir = llama_cpp_checkout()
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    from gguf import GGUFReader
    env = dict(os.environ, LD_LIBRARY_PATH=bindir + os.pathsep + os.environ.get("LD_LIBRARY_PATH", ""))
    source = os.path.join(OUT, "llama256-f16.gguf")
    ref = json.load(open(os.path.join(ROOT, "Tests", "Fixtures", "models", "llama", "reference.json")))
    seq = ",".join(str(t) for t in ref["prompt_ids"] + ref["greedy_ids"])
    exe = os.environ.get("PEREGRINE") or os.path.join(ROOT, ".build", "debug", "peregrine")
    types = {}
    with tempfile.TemporaryDirectory() as d:
        tool = os.path.join(d, "llamacpp_logits")
        subprocess.run(["cc", "-O2", os.path.join(ROOT, "scripts", "llamacpp_logits.c"), "-I", os.path.join(src, "include"),
                        "-I", os.path.join(src, "ggml", "include"), "-L", bindir, "-lllama", "-Wl,-rpath," + bindir, "-o", tool],
                       check=True)

        def logits(path, name):
            subprocess.run([tool, path, os.path.join(OUT, f"{name}.llamacpp_logits.bin"), seq], check=True, env=env,
                           capture_output=True)
            print(name, "llama.cpp logits,", os.path.getsize(path), "bytes of GGUF")

        for i, mix in enumerate(LOW_K_MIXES):
            committed = i < 2
            path = os.path.join(OUT if committed else d, f"llama256-{mix.lower()}.gguf")
            subprocess.run([os.path.join(bindir, "llama-quantize"), source, path, mix], check=True, env=env, capture_output=True)
            types[mix] = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
            if committed:
                logits(path, f"llama256-{mix.lower()}")
                ours = os.path.join(d, f"peregrine-{mix}.gguf")
                subprocess.run([exe, "quantize", "-m", source, "--type", mix, "-o", ours], check=True, capture_output=True)
                logits(ours, f"peregrine-llama256-{mix.lower()}")
    with open(os.path.join(OUT, "llama256-low-k-types.json"), "w") as f:
        json.dump({"source": "llama256-f16.gguf", "command": "llama-quantize SOURCE OUT MIX", "types": types}, f, indent=1,
                  sort_keys=True)


def make_gemma_fixtures():
    """Gemma 2 and Gemma 3 converted by llama.cpp's converter (which stores norm weights with the 1
    of Gemma's (1 + weight) added) and llama.cpp's logits on each file for the fixture's prompt and
    greedy continuation."""
    import tempfile
    src = os.environ["LLAMA_CPP_DIR"]
    bin_dir = os.environ.get("LLAMA_CPP_BIN", os.path.join(src, "build", "bin"))
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "llamacpp_logits")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(ROOT, "scripts", "llamacpp_logits.c"),
                        "-I" + os.path.join(src, "include"), "-I" + os.path.join(src, "ggml", "include"),
                        "-L" + bin_dir, "-lllama", "-Wl,-rpath," + bin_dir], check=True)
        for name, outtype in [("gemma2", "f32"), ("gemma3", "f32"), ("gemma3", "q8_0")]:
            model = os.path.join(ROOT, "Tests", "Fixtures", "models", name)
            path = os.path.join(OUT, f"{name}-{outtype}.gguf")
            subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), model, "--outtype", outtype,
                            "--outfile", path], check=True, env=env, cwd=src, capture_output=True)
            ref = json.load(open(os.path.join(model, "reference.json")))
            ids = ",".join(str(i) for i in ref["prompt_ids"] + ref["greedy_ids"])
            logits = os.path.join(OUT, f"{name}-{outtype}.llamacpp_logits.bin")
            subprocess.run([exe, path, logits, ids], check=True, env=dict(os.environ, LD_LIBRARY_PATH=bin_dir))
            print(path, os.path.getsize(path), "bytes; llama.cpp logits for", len(ref["prompt_ids"]) + len(ref["greedy_ids"]), "positions")


def main():
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] == ["--phi3-only"]:
        make_phi3_fixtures()
    elif sys.argv[1:] == ["--moe-only"]:
        make_moe_fixtures()
    elif sys.argv[1:] == ["--iq4-only"]:
        make_iq4_fixtures()
        return
    elif sys.argv[1:] == ["--low-k-only"]:
        make_low_k_fixtures()
        return
    elif sys.argv[1:] == ["--gemma-only"]:
        make_gemma_fixtures()
        return
    if sys.argv[1:] == ["--peregrine-only"]:
        record_peregrine_quantized()
        return
    if sys.argv[1:] == ["--perplexity-only"]:
        record_perplexity()
        return
    if sys.argv[1:] == ["--kquant-only"]:
        make_kquant_fixture(llama_cpp_sources())
        return
    src = llama_cpp_sources()
    path = convert_fixture(src, "f32")
    record_llama_cpp_logits(convert_fixture(src, "q8_0"), "llama-q8_0")
    # Q4_0 comes from llama.cpp's quantizer (its converter writes no 4-bit types); llama.cpp
    # keeps the output matrix in Q8_0 there.
    import ctypes
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    q4 = os.path.join(OUT, "llama-q4_0.gguf")
    assert llama_cpp.llama_model_quantize(os.path.join(OUT, "llama-f32.gguf").encode(), q4.encode(), ctypes.byref(params)) == 0
    record_llama_cpp_logits(q4, "llama-q4_0")
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    from gguf import GGUFReader, GGUFValueType
    r = GGUFReader(path)
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        t = f.types[0]
        if t == GGUFValueType.ARRAY:
            meta[f.name] = {"array_of": f.types[1].name, "count": len(f.data)}
        elif t == GGUFValueType.STRING:
            meta[f.name] = {"string": str(bytes(f.parts[f.data[0]]), "utf-8")}
        else:
            meta[f.name] = {t.name.lower(): f.parts[f.data[0]].tolist()[0]}
    tensors = [{"name": t.name, "shape": [int(x) for x in t.shape], "type": int(t.tensor_type),
                "offset": int(t.data_offset), "bytes": int(t.n_bytes)} for t in r.tensors]
    with open(os.path.join(OUT, "llama-f32.json"), "w") as f:
        json.dump({"version": 3, "alignment": r.alignment, "metadata": meta, "tensors": tensors}, f, indent=1,
                  ensure_ascii=False)
    print(path, os.path.getsize(path), "bytes,", len(tensors), "tensors,", len(meta), "metadata keys")
    record_llama_cpp_logits(path, "llama-f32")
    make_kquant_fixture(src)
    record_perplexity()
    record_peregrine_quantized()


if __name__ == "__main__":
    main()
