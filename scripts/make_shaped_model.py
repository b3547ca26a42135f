#!/usr/bin/env python3
"""A random-weight Llama-family model of a chosen shape, BF16, in the Hugging Face layout, with
numpy only (no torch): for CPU speed comparisons on shapes bigger than the shipped model. The
tokenizer and vocabulary are the shipped model's (models/target), so the output projection is
small; speed does not depend on what the weights say.

    python3 scripts/make_shaped_model.py OUT_DIR [--shape 1b]
    peregrine quantize -m OUT_DIR --type Q4_0 -o OUT.gguf      # a GGUF for both engines

Shapes: 1b (Llama-3.2-1B's layers: 16 x 2048 hidden, 8192 MLP, 32 query heads over 8 KV heads
of 64).
"""
import argparse
import json
import os
import shutil

import numpy as np

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
}


def bf16(a):
    """float32 -> bfloat16 bits, rounded to nearest even."""
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--source", default=os.path.join(os.path.dirname(__file__), "..", "models", "target"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.source, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(SHAPES[args.shape])
    cfg["max_position_embeddings"] = 4096
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(args.source, name)):
            shutil.copy(os.path.join(args.source, name), args.out)

    rng = np.random.default_rng(0)
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                   (p + "self_attn.q_proj.weight", (q, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                   (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, q)),
                   (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                   (p + "mlp.down_proj.weight", (d, f))]
    shapes.append(("model.norm.weight", (d,)))
    header, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for name, shape in shapes:
            if len(shape) == 1:
                out.write(bf16(np.ones(shape, np.float32)).tobytes())
            else:
                out.write(bf16(rng.standard_normal(shape, np.float32) * 0.02).tobytes())
    print(f"{args.out}: {args.shape}, {offset / 2 / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
