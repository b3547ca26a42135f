#!/usr/bin/env python3
"""A random-weight model in the shape of Llama 3 8B (32 layers, 4096 hidden, 14336 MLP, 32 query
heads over 8 KV heads of 128, 128256 vocabulary, untied output), BF16, in the Hugging Face
layout, for the GPU benchmarks. The weights are drawn on the GPU (normal, std 0.02) and written
with safetensors; the tokenizer is a byte-level BPE of the same vocabulary size with random
merges (make_large_tokenizer.py). Speed does not depend on what the weights say. Its context is
32,768 positions (Llama 3 8B's is 8,192), so that decode can be measured at depths of 16k.

Run on the GPU machine: python3 scripts/make_gpu_model.py OUT_DIR [LAYERS]
(LAYERS, 32 by default: fewer give the same per-layer products in less time to make and quantize,
for comparing two kernels rather than whole-model speed.)
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bench_models import LLAMA3_PATTERN, tokenizer_json  # noqa: E402


def main(out, layers=32):
    os.makedirs(out, exist_ok=True)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=128001, torch_dtype="bfloat16")
    cfg.save_pretrained(out)
    g = torch.Generator(device="cuda").manual_seed(0)
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()

    shards, index = [], {}
    tensors = {"model.embed_tokens.weight": rand(cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
                        p + "self_attn.q_proj.weight": rand(d, d), p + "self_attn.k_proj.weight": rand(kv, d),
                        p + "self_attn.v_proj.weight": rand(kv, d), p + "self_attn.o_proj.weight": rand(d, d),
                        p + "mlp.gate_proj.weight": rand(f, d), p + "mlp.up_proj.weight": rand(f, d),
                        p + "mlp.down_proj.weight": rand(d, f)})
        if i % 8 == 7:
            shards.append(tensors)
            tensors = {}
    tensors.update({"model.norm.weight": torch.ones(d, dtype=torch.bfloat16), "lm_head.weight": rand(cfg.vocab_size, d)})
    shards.append(tensors)
    total = 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
        for k, v in shard.items():
            index[k] = name
            total += v.numel() * 2
    json.dump({"metadata": {"total_size": total}, "weight_map": index}, open(os.path.join(out, "model.safetensors.index.json"), "w"))
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    json.dump(tokenizer_json(cfg.vocab_size, specials, LLAMA3_PATTERN, "<|begin_of_text|>"),
              open(os.path.join(out, "tokenizer.json"), "w"), ensure_ascii=False)
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    print(out, total // 2, "parameters", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)
