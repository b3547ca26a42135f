#!/usr/bin/env python3
"""Makes the models the CPU benchmarks compare on, in the Hugging Face layout, F16:

- target-f16: the shipped reference model (models/target, BF16) with its weights cast to F16;
- llama-1b-shape: random weights in the shape of Llama 3.2 1B (16 layers, 2048 hidden, 8192 MLP,
  32 query heads over 8 KV heads, 128256 vocabulary, tied embeddings, llama3 RoPE scaling);
- qwen2.5-0.5b-shape: random weights in the shape of Qwen2.5 0.5B (24 layers, 896 hidden, 4864
  MLP, 14 query heads over 2 KV heads, q/k/v biases, 151936 vocabulary, tied embeddings);
- qwen3-moe-small-shape: random weights in a scaled-down Qwen3-30B-A3B shape, small enough for a
  two-core machine (8 layers, 768 hidden, 64 experts of 256 with 8 a token, 12 query heads over 4
  KV heads of 64, q/k norms, 151936 vocabulary, tied embeddings): 0.43B parameters, 0.17B active.

The random models get byte-level BPE tokenizers of their vocabulary size with random merges
(see make_large_tokenizer.py); speed does not depend on what the weights say.

Run: python3 scripts/make_bench_models.py [OUT_DIR]    (default: .bench-models; needs torch,
transformers, tokenizers)
"""
import json
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_large_tokenizer import random_bpe  # noqa: E402
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def tokenizer_json(vocab_size, specials, pattern, bos):
    """A valid byte-level BPE tokenizer.json with exactly vocab_size entries."""
    vocab, merges = random_bpe(vocab_size - len(specials), seed=vocab_size)
    added = [dict(id=len(vocab) + i, content=c, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=True) for i, c in enumerate(specials)]
    post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if bos:
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [len(vocab) + specials.index(bos)], "tokens": [bos]}}}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": post, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": vocab, "merges": merges}}


def save_random(out, cls, config, tokenizer, tok_config):
    if os.path.exists(out):
        shutil.rmtree(out)
    torch.manual_seed(0)
    with torch.no_grad():
        model = cls(config).to(torch.float16)
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True)
    json.dump(tokenizer, open(os.path.join(out, "tokenizer.json"), "w"), ensure_ascii=False)
    json.dump(tok_config, open(os.path.join(out, "tokenizer_config.json"), "w"), indent=1)
    print(out, sum(p.numel() for p in model.parameters()), "parameters", flush=True)


def main(out_root):
    os.makedirs(out_root, exist_ok=True)
    # The reference model in F16.
    out = os.path.join(out_root, "target-f16")
    if os.path.exists(out):
        shutil.rmtree(out)
    m = LlamaForCausalLM.from_pretrained(os.path.join(ROOT, "models", "target"), dtype=torch.float32)
    m.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ROOT, "models", "target", f), out)
    print(out, flush=True)

    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(254)]
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                      rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000,
                      eos_token_id=128001,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    save_random(os.path.join(out_root, "llama-1b-shape"), LlamaForCausalLM, cfg,
                tokenizer_json(128256, specials, LLAMA3_PATTERN, "<|begin_of_text|>"),
                {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"})

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(291)]
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643,
                      eos_token_id=151643)
    save_random(os.path.join(out_root, "qwen2.5-0.5b-shape"), Qwen2ForCausalLM, cfg,
                tokenizer_json(151936, specials, QWEN2_PATTERN, None),
                {"bos_token": None, "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})

    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=768, intermediate_size=2048, moe_intermediate_size=256,
                         num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=8,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=32768,
                         rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, bos_token_id=151643,
                         eos_token_id=151643)
    save_random(os.path.join(out_root, "qwen3-moe-small-shape"), Qwen3MoeForCausalLM, cfg,
                tokenizer_json(151936, specials, QWEN2_PATTERN, None),
                {"bos_token": None, "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".bench-models"))
