#!/usr/bin/env python3
"""A random-weight mixture-of-experts model in the shape of Qwen3-30B-A3B, written straight to a
BF16 GGUF file (`qwen3moe`) for the GPU benchmarks: 2048 hidden, 32 query heads over 4 KV heads
of 128 with q/k norms, 128 experts of 768 with 8 chosen a token, 151936 vocabulary, untied
output. Qwen3-30B-A3B has 48 layers (61 GB in BF16); `--layers` keeps fewer so that the BF16 file
and its Q4_K_M fit a 64 GB disk beside each other (24 layers: 15.3B parameters, 1.5B active).
Every layer has the full model's shape, so the time a layer takes is the full model's.

The weights are drawn on the GPU when there is one (normal, std 0.02; the router's F32, as
llama.cpp's converter keeps it) and streamed to the file a tensor at a time. The tokenizer is a
byte-level BPE of the same vocabulary size with random merges (make_large_tokenizer.py), stored
as llama.cpp's `gpt2` vocabulary with the `qwen2` pre-tokenizer. Speed does not depend on what
the weights say. Writing the file needs llama.cpp's gguf-py (`--gguf-py DIR`, or on the path).

Run on the GPU machine: python3 scripts/make_gpu_moe_gguf.py OUT.gguf [--layers 24]
`--small` makes the scaled-down shape the CPU benchmarks use (8 layers, 768 hidden, 64 experts
of 256 with 8 a token, 12 query heads over 4 KV heads of 64), `--tiny` a very small model of the
same structure to check the script; `--f16` writes F16 instead of BF16. `--mixtral-small` makes
a scaled-down Mixtral-8x7B shape instead (GGUF `llama` with stacked experts, no q/k norms: 8
layers, 1024 hidden, 8 query heads over 2 KV heads of 128, 8 experts of 3584 with 2 chosen a
token, 32,000 vocabulary, untied output: 0.79B parameters, 0.23B active). Without PyTorch the
weights come from numpy (slower; the CPU shapes only).
"""
import argparse
import os
import sys

import numpy as np

try:
    import torch
except ImportError:  # the CPU shapes can be drawn with numpy
    torch = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_large_tokenizer import random_bpe  # noqa: E402

FULL = dict(vocab=151936, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, used=8, expert_ff=768, layers=48)
# Scaled down for a two-core CPU (the benchmarks' qwen3-moe-small-shape): 0.43B parameters.
SMALL = dict(vocab=151936, hidden=768, heads=12, kv_heads=4, head_dim=64, experts=64, used=8, expert_ff=256, layers=8)
TINY = dict(vocab=1024, hidden=256, heads=4, kv_heads=2, head_dim=64, experts=16, used=4, expert_ff=128, layers=2)
# Mixtral-8x7B's proportions (32/8 heads of 128, 8 experts of 3.5 x hidden, top-2) scaled down for a two-core CPU.
MIXTRAL_SMALL = dict(vocab=32000, hidden=1024, heads=8, kv_heads=2, head_dim=128, experts=8, used=2, expert_ff=3584, layers=8)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, help="layers to keep (default: all 48)")
    ap.add_argument("--small", action="store_true", help="the CPU benchmarks' scaled-down shape")
    ap.add_argument("--tiny", action="store_true", help="a very small model of the same structure")
    ap.add_argument("--mixtral-small", action="store_true", help="a scaled-down Mixtral-8x7B shape (GGUF llama with experts)")
    ap.add_argument("--f16", action="store_true", help="F16 weights instead of BF16")
    ap.add_argument("--gguf-py", help="llama.cpp's gguf-py directory, if gguf is not installed")
    a = ap.parse_args()
    if a.gguf_py:
        sys.path.insert(0, a.gguf_py)
    import gguf

    mixtral = a.mixtral_small
    s = dict(MIXTRAL_SMALL if mixtral else TINY if a.tiny else SMALL if a.small else FULL)
    if a.layers:
        s["layers"] = a.layers
    d, v, L, E = s["hidden"], s["vocab"], s["layers"], s["experts"]
    q, kv, ff = s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["expert_ff"]
    if torch is not None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        g = torch.Generator(device=device).manual_seed(0)
        half = torch.float16 if a.f16 else torch.bfloat16

        def rand(*shape, dtype=half):
            t = (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
            return t.view(torch.int16).numpy() if dtype == torch.bfloat16 else t.numpy()
    else:
        rng = np.random.default_rng(0)
        half = np.float16 if a.f16 else "bf16"

        def rand(*shape, dtype=half):
            t = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
            if dtype == "bf16":  # round to nearest even, kept as the int16 bit patterns
                b = t.view(np.uint32)
                return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16).view(np.int16)
            return t.astype(dtype)
    f32 = torch.float32 if torch is not None else np.float32

    def ones(n):
        return np.ones(n, dtype=np.float32)

    # name -> (shape in row-major order, GGML type, maker)
    BF16 = gguf.GGMLQuantizationType.F16 if a.f16 else gguf.GGMLQuantizationType.BF16
    F32 = gguf.GGMLQuantizationType.F32
    plan = [("token_embd.weight", (v, d), BF16, lambda: rand(v, d))]
    for i in range(L):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (d,), F32, lambda: ones(d)),
            (p + "attn_q.weight", (q, d), BF16, lambda: rand(q, d)),
            (p + "attn_k.weight", (kv, d), BF16, lambda: rand(kv, d)),
            (p + "attn_v.weight", (kv, d), BF16, lambda: rand(kv, d)),
            (p + "attn_output.weight", (d, q), BF16, lambda: rand(d, q)),
        ] + ([] if mixtral else [
            (p + "attn_q_norm.weight", (s["head_dim"],), F32, lambda: ones(s["head_dim"])),
            (p + "attn_k_norm.weight", (s["head_dim"],), F32, lambda: ones(s["head_dim"])),
        ]) + [
            (p + "ffn_norm.weight", (d,), F32, lambda: ones(d)),
            (p + "ffn_gate_inp.weight", (E, d), F32, lambda: rand(E, d, dtype=f32)),
            (p + "ffn_gate_exps.weight", (E, ff, d), BF16, lambda: rand(E, ff, d)),
            (p + "ffn_up_exps.weight", (E, ff, d), BF16, lambda: rand(E, ff, d)),
            (p + "ffn_down_exps.weight", (E, d, ff), BF16, lambda: rand(E, d, ff)),
        ]
    plan += [("output_norm.weight", (d,), F32, lambda: ones(d)), ("output.weight", (v, d), BF16, lambda: rand(v, d))]

    arch = "llama" if mixtral else "qwen3moe"
    w = gguf.GGUFWriter(a.out, arch)
    w.add_name("mixtral-small-shape" if mixtral else "qwen3-moe-small-shape" if a.small
               else "qwen3-30b-a3b-shape" + ("-tiny" if a.tiny else f"-{L}-layers" if L != 48 else ""))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if a.f16 else gguf.LlamaFileType.MOSTLY_BF16)
    w.add_block_count(L)
    w.add_context_length(32768)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff if mixtral else 4 * d if a.tiny or a.small else 6144)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(s["head_dim"])
    w.add_value_length(s["head_dim"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-5 if mixtral else 1e-6)
    w.add_expert_count(E)
    w.add_expert_used_count(s["used"])
    if mixtral:
        w.add_rope_dimension_count(s["head_dim"])
    else:
        w.add_expert_feed_forward_length(ff)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab, merges = random_bpe(v - len(specials), seed=v)
    tokens = sorted(vocab, key=vocab.get) + specials
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (v - len(specials)) + [gguf.TokenType.CONTROL] * len(specials))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(v - 3)
    w.add_eos_token_id(v - 1)
    w.add_add_bos_token(False)
    for name, shape, t, _ in plan:
        elements = int(np.prod(shape))
        nbytes = elements * (2 if t == BF16 else 4)
        w.add_tensor_info(name, shape, np.dtype(np.float16 if t == BF16 else np.float32), nbytes, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total = 0
    for name, shape, t, make in plan:
        data = make()
        assert data.shape == shape, (name, data.shape, shape)
        w.write_tensor_data(data)
        total += data.size
    w.close()
    print(a.out, f"{total:,} parameters", flush=True)


if __name__ == "__main__":
    main()
