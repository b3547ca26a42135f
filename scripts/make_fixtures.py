#!/usr/bin/env python3
"""Builds the reference fixtures under Tests/Fixtures with the Hugging Face libraries.

- tokenizers/<kind>/: a small tokenizer of each kind Peregrine reads (byte-level BPE with the GPT-2,
  Llama 3 and Qwen2 pre-tokenizers, and with SmolLM2's single-digit split before GPT-2's;
  SentencePiece-style BPE, legacy and metaspace), trained with the `tokenizers` library, and
  tokenizer_cases.json: its ids and decodings of the test strings.
- models/<name>/: tiny randomly initialised models of each supported architecture in the
  transformers layout, with reference.json (prompt ids, greedy continuation) and
  reference_logits.bin (transformers' f32 logits for every position of prompt + continuation).
- models/phi4, phi3-partial, phi3.5-longrope: tiny Phi3ForCausalLM models (fused qkv and gate_up
  projections): plain (Phi-4), partial rotary with a sliding window (rotating the first half of each
  head), and LongRoPE whose original_max_position_embeddings lies inside the greedy continuation,
  so the short factors give way to the long ones. Their greedy continuation is transformers'
  generation through its cache (prompt in one pass, then a token at a time), whose logits are
  also kept (reference_logits_incremental.bin): with LongRoPE they differ from one pass over the
  whole sequence, which uses the long factors at every position.

  The mixture-of-experts models (mixtral, qwen2_moe, qwen2_moe-dense-layer, qwen3_moe) are
  re-seeded until every routing decision is clear too (the k-th and (k+1)-th router
  logits of every token apart), so the comparison cannot hinge on a near tie.

- models/gemma2, models/gemma3: the same for Gemma 2 and Gemma 3 (text), with a small
  SentencePiece tokenizer of Gemma's kind (tokenizer.model, trained with sentencepiece, and the
  tokenizer.json transformers converts it to).

Run: python3 scripts/make_fixtures.py   (needs torch, transformers, tokenizers, safetensors)
     python3 scripts/make_fixtures.py --phi3
       builds only the Phi-3 models, with the committed tokenizers.
     python3 scripts/make_fixtures.py --keep-tokenizers
       trains only the tokenizers that are not committed yet and recomputes tokenizer_cases.json
       from the committed tokenizer.json files (training is not reproducible for every kind);
       no model is rebuilt.
     python3 scripts/make_fixtures.py --moe-only [name...]   (only the mixture-of-experts models,
     or the ones named, with the committed tokenizers)
     python3 scripts/make_fixtures.py --gemma
       remakes only the Gemma fixtures (needs sentencepiece too).
The outputs are committed, so the Swift tests need no Python.
"""
import glob
import json
import os
import shutil
import struct
import sys

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers, Regex
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Tests", "Fixtures")

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Strings every tokenizer is checked on: unicode, emoji, CJK, whitespace runs, digits, code,
# contractions, special tokens inside text.
TEST_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand  \n\n  blank lines\n",
    "I'm sure they'll say it's fine; WE'RE NOT, you've DON'T I'd",
    "Numbers: 0 12 345 6789 1234567890 3.14159 -42 1e10 100,000",
    "Unicode: café naïve résumé Ångström Straße",
    "Combining: e\u0301 a\u0308 n\u0303",
    "CJK: 日本語のテキスト、中文文本。한국어 텍스트",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇯🇵",
    "Code:\n    def f(x):\n        return x ** 2  # square\n\tif (a && b) { c++; }",
    "Symbols: ~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "Spaces\u00a0non\u2003breaking\u3000ideographic",
    "mixed123numbers456and789letters",
    "a",
    " ",
    "",
    "\n",
    "Ŝtrange Ĉharacters ſ 'S 'ſ",
    "Arabic: مرحبا بالعالم Hebrew: שלום Greek: Καλημέρα Cyrillic: Привет",
    "repeated!!!!!!!???...---",
    # Numbers by general category (Nd, Nl, No) beside CJK numerals, which have numeric values but
    # are letters (Lo).
    "Numerals: 零 一二三 〇 ½ ¾ Ⅻ ① ² ٣ ১ 42 零点五",
]

# Text only the digits tokenizer is trained on, so that its merges join a space to a CJK numeral's
# first byte (" 零" is one word when the numeral is a letter).
NUMERAL_CORPUS = "零 一 二 三 四 五 六 七 八 九 十 百 千 万 零点 〇 ½ Ⅻ ① 12 345\n" * 3000


def corpus_text():
    parts = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.isfile(path) and not os.path.islink(path):
            with open(path, encoding="utf-8", errors="ignore") as f:
                parts.append(f.read())
    parts.extend(TEST_STRINGS[:12])  # a little unicode and code, not everything
    parts.append("Emoji 😀 and CJK 日本 appear rarely. Numbers 2024 and 3.14 appear often. def main(): return 0\n" * 3)
    return parts


def specials_for(kind):
    return {
        "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "gpt2": ["<|endoftext|>"],
        "digits": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "llama2": ["<unk>", "<s>", "</s>"],
        "metaspace": ["<unk>", "<s>", "</s>"],
        "gemma": ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
    }[kind]


def train_byte_level(kind, vocab_size=400):
    tok = Tokenizer(models.BPE(ignore_merges=(kind == "llama3")))
    corpus = corpus_text()
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif kind == "digits":
        # SmolLM2's: every digit its own piece, then GPT-2's split and bytes.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        corpus.append(NUMERAL_CORPUS)
    else:
        pattern = LLAMA3_PATTERN if kind == "llama3" else QWEN2_PATTERN
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(specials_for(kind))
    if kind == "llama3":
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_sentencepiece_style(kind, vocab_size=420):
    """Llama 2 / Mistral style: BPE over raw characters with '▁' for spaces and byte fallback."""
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, min_frequency=2, show_progress=False,
                                  limit_alphabet=90, special_tokens=[])
    base.train_from_iterator(corpus_text(), trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {}
    for s in specials_for(kind):
        vocab[s] = len(vocab)
    for b in range(256):
        vocab["<0x%02X>" % b] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if kind == "llama2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)])
    tok.add_special_tokens(specials_for(kind))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_tokenizer(tok, kind, directory):
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    sp = specials_for(kind)
    if kind in ("llama2", "metaspace"):
        bos, eos = "<s>", "</s>"
    elif kind == "llama3":
        bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    else:
        bos, eos = None, sp[0]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "model_max_length": 256}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def tokenizer_cases(tok, kind):
    sp = specials_for(kind)
    strings = list(TEST_STRINGS)
    strings.append(f"Special {sp[-1]} inside{sp[0]}text {sp[-1]}")
    strings.append(f"{sp[0]}{sp[-1]}")
    cases = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=True).ids
        raw = tok.encode(s, add_special_tokens=False).ids
        cases.append({"text": s, "ids": ids, "ids_no_special": raw,
                      "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
    # Decoding of arbitrary id sequences, including ones that split UTF-8 characters.
    n = tok.get_vocab_size()
    g = torch.Generator().manual_seed(7)
    random_ids = [torch.randint(0, n, (12,), generator=g).tolist() for _ in range(8)]
    decodes = [{"ids": r, "decoded": tok.decode(r, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(r, skip_special_tokens=True)} for r in random_ids]
    return {"cases": cases, "decodes": decodes}


PROMPT = "The quick brown fox jumps over the lazy dog. Numbers 1234 and café, 日本."
GREEDY_STEPS = 12


def build_model(name, arch, cfg_kwargs, tok, kind, seed, cached=False, routing=1e-3):
    cls_cfg, cls_model = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "phi3": (Phi3Config, Phi3ForCausalLM),
        "mixtral": (MixtralConfig, MixtralForCausalLM),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    }[arch]
    vocab = tok.get_vocab_size()
    bos = tok.token_to_id(specials_for(kind)[1 if kind in ("llama2", "metaspace") else 0])
    eos_name = {"llama3": "<|end_of_text|>", "qwen2": "<|endoftext|>", "llama2": "</s>", "metaspace": "</s>"}[kind]
    eos = tok.token_to_id(eos_name)
    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, initializer_range=0.25, bos_token_id=bos, eos_token_id=eos,
                attn_implementation="eager")
    if arch == "phi3":
        base["pad_token_id"] = eos  # Phi3Config's default (32000) lies outside a tiny vocabulary
    if callable(cfg_kwargs):
        cfg_kwargs = cfg_kwargs(len(tok.encode(PROMPT, add_special_tokens=True).ids))
    base.update(cfg_kwargs)
    config = cls_cfg(**base)
    # Re-seed until every greedy step has a clear winner, so the comparison cannot hinge on a tie.
    for attempt in range(50):
        torch.manual_seed(seed + attempt)
        model = cls_model(config).eval().float()
        with torch.no_grad():
            # Norm weights start at exactly 1 and biases at 0; perturb both so they matter.
            for n_, p in model.named_parameters():
                if n_.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif n_.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        ids = tok.encode(PROMPT, add_special_tokens=True).ids
        if cached:
            greedy, margins, incremental = greedy_through_cache(model, ids)
            seq = ids + greedy
        else:
            seq = list(ids)
            margins = []
            with torch.no_grad():
                for _ in range(GREEDY_STEPS):
                    logits = model(torch.tensor([seq])).logits[0, -1]
                    top = torch.topk(logits, 2).values
                    margins.append(float(top[0] - top[1]))
                    seq.append(int(torch.argmax(logits)))
        if min(margins) > 2e-3 and routing_margin(model, seq) > routing:
            break
    else:
        sys.exit(f"{name}: no seed gave clear greedy margins")
    with torch.no_grad():
        full_logits = model(torch.tensor([seq])).logits[0].float()
    if cached:
        return model, ids, seq[len(ids):], full_logits, min(margins), incremental
    return model, ids, seq[len(ids):], full_logits, min(margins)


def greedy_through_cache(model, ids):
    """Greedy decoding as transformers generates: the prompt in one pass, then each chosen token
    through the cache. Returns the continuation, each step's top-2 margin and the logits of every
    position of prompt + continuation as computed on the way (the last token is fed too, so its
    row exists as in one pass over the whole sequence)."""
    import inspect
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        rows = [out.logits[0].float()]
        greedy, margins = [], []
        for step in range(GREEDY_STEPS):
            last = out.logits[0, -1]
            top = torch.topk(last, 2).values
            margins.append(float(top[0] - top[1]))
            greedy.append(int(torch.argmax(last)))
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            out = model(torch.tensor([[greedy[-1]]]), use_cache=True, **{cache_arg: cache})
            rows.append(out.logits[0].float())
    return greedy, margins, torch.cat(rows, 0)


def routing_margin(model, seq):
    """The smallest gap, over every token and MoE layer, between the k-th and (k+1)-th router
    logits (infinite for a dense model): how far the expert choice is from a tie."""
    k = getattr(model.config, "num_experts_per_tok", None)
    routers = [m for n_, m in model.named_modules() if n_.endswith("mlp.gate") or n_.endswith("block_sparse_moe.gate")]
    if k is None or not routers:
        return float("inf")
    logits = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: logits.append(out[0] if isinstance(out, tuple) else out))
             for r in routers]
    with torch.no_grad():
        model(torch.tensor([seq]))
    for h in hooks:
        h.remove()
    worst = float("inf")
    for l in logits:
        # In logits: the softmax keeps their order, and float noise in them is what could swap two experts.
        p = l.float().reshape(-1, l.shape[-1]).sort(dim=-1, descending=True).values
        if p.shape[-1] > k:
            worst = min(worst, float((p[:, k - 1] - p[:, k]).min()))
    return worst


# Mixture-of-experts fixtures: name, arch, config overrides, tokenizer kind. Mixtral has 8
# experts (top 2, weights renormalized); Qwen2-MoE a shared expert under a sigmoid gate,
# unnormalized top-k weights and an output matrix of its own (llama.cpp's qwen2moe needs one);
# the dense-layer variant an MLP-only layer (mlp_only_layers) and normalized weights; Qwen3-MoE
# 16 experts, top 8, q/k norms. Rows of 32 or more values where the GGUF fixtures quantize them
# (Mixtral).
MOE_SPECS = [
    ("mixtral", "mixtral", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                tie_word_embeddings=True, rope_theta=1000000.0), "llama3"),
    ("qwen2_moe", "qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, intermediate_size=64, norm_topk_prob=False,
                                    tie_word_embeddings=False, rope_theta=1000000.0), "qwen2"),
    ("qwen2_moe-dense-layer", "qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                shared_expert_intermediate_size=32, intermediate_size=64,
                                                norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=True,
                                                rope_theta=1000000.0), "qwen2"),
    ("qwen3_moe", "qwen3_moe", dict(num_experts=16, num_experts_per_tok=8, moe_intermediate_size=8, intermediate_size=64,
                                    head_dim=32, norm_topk_prob=True, tie_word_embeddings=True, rope_theta=1000000.0),
     "qwen2"),
]


def make_moe_models(toks, model_root, only=None, seed_base=9000):
    for i, (name, arch, kw, kind) in enumerate(MOE_SPECS):
        if only and name not in only:
            continue
        model, ids, greedy, logits, margin = build_model(name, arch, kw, toks[kind], kind, seed=seed_base + 100 * i)
        write_model(os.path.join(model_root, name), model, toks[kind], kind, ids, greedy, logits,
                    extra={"routing_margin": routing_margin(model, ids + greedy)})
        print(f"{name}: {len(ids)} prompt tokens, greedy margin {margin:.4f}, routing margin {routing_margin(model, ids + greedy):.5f}")


def write_model(directory, model, tok, kind, ids, greedy, logits, extra=None, dtype=torch.float32, tokenizer_class=None):
    if os.path.exists(directory):
        shutil.rmtree(directory)
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tok, kind, directory)
    if tokenizer_class:
        # As Phi-4 ships it (llama.cpp's converter reads the class to choose the vocabulary's kind).
        path = os.path.join(directory, "tokenizer_config.json")
        cfg = json.load(open(path))
        cfg["tokenizer_class"] = tokenizer_class
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    with open(os.path.join(directory, "reference_logits.bin"), "wb") as f:
        f.write(logits.contiguous().numpy().astype("<f4").tobytes())
    ref = {"prompt": PROMPT, "prompt_ids": ids, "greedy_ids": greedy, "rows": logits.shape[0], "vocab": logits.shape[1]}
    ref.update(extra or {})
    with open(os.path.join(directory, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)


TOKENIZER_KINDS = ["llama3", "qwen2", "gpt2", "llama2", "metaspace", "digits"]


def longrope_config(prompt_tokens):
    """Phi-3.5-style LongRoPE, the original context ending 4 tokens into the continuation.
    max_position_embeddings / original gives the attention factor transformers derives."""
    half = 8  # head_dim 16, full rotary
    return dict(original_max_position_embeddings=prompt_tokens + 4,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                     short_factor=[1.0 + 0.05 * i for i in range(half)],
                                     long_factor=[1.0 + 2.5 * i for i in range(half)]))


# name, config overrides (or a function of the prompt's length giving them), tokenizer kind
PHI3_SPECS = [
    ("phi4", dict(rope_theta=250000.0), "llama3"),
    ("phi3-partial", dict(partial_rotary_factor=0.5, sliding_window=16), "llama3"),
    ("phi3.5-longrope", longrope_config, "llama3"),
]


def build_phi3_models(toks, model_root):
    for i, (name, kw, kind) in enumerate(PHI3_SPECS):
        model, ids, greedy, logits, margin, incremental = build_model(
            name, "phi3", kw, toks[kind], kind, seed=9000 + 100 * i, cached=True)
        d = os.path.join(model_root, name)
        write_model(d, model, toks[kind], kind, ids, greedy, logits, tokenizer_class="GPT2Tokenizer",
                    extra={"note": "greedy_ids: transformers' generation through its cache; "
                                   "reference_logits_incremental.bin: the logits computed on the way"})
        with open(os.path.join(d, "reference_logits_incremental.bin"), "wb") as f:
            f.write(incremental.contiguous().numpy().astype("<f4").tobytes())
        differ = float((incremental - logits).abs().max())
        print(f"{name}: {len(ids)} prompt tokens, greedy margin {margin:.4f}, "
              f"max |incremental - one pass| {differ:.3g}")


def gemma_tokenizer(directory):
    """A SentencePiece BPE model trained the way Gemma's is set up (byte fallback, no dummy prefix,
    no normalization, digits split, whitespace kept), Gemma's special tokens first, and the
    tokenizer.json transformers' GemmaTokenizer converts it to. Both go into `directory`."""
    import io
    import sentencepiece as spm
    from tokenizers import Tokenizer as FastTokenizer
    from transformers import AutoTokenizer
    os.makedirs(directory, exist_ok=True)
    # Sentences from an iterator and the model to memory: the model records no file names.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
            sentence_iterator=iter("\n".join(corpus_text()).split("\n")), model_writer=model, model_type="bpe", vocab_size=600,
            byte_fallback=True, add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], character_coverage=0.9995,
            minloglevel=2, max_sentence_length=100000)
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": True, "add_eos_token": False}, f, indent=2)
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    config = json.load(open(os.path.join(directory, "tokenizer_config.json")))
    config.pop("vocab_file", None)  # where it was converted from
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return FastTokenizer.from_file(os.path.join(directory, "tokenizer.json"))


def make_gemma_fixtures(model_root):
    """Tiny Gemma 2 and Gemma 3 models: sliding windows shorter than the test sequence, Gemma 2's
    soft-capping of attention scores and final logits and a query_pre_attn_scalar other than the
    head size, Gemma 3's q/k norms, its 5:1 pattern of local and global layers over 6 layers with
    a local RoPE base and linear scaling on the global layers."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tok = gemma_tokenizer(d)
        files = {f: open(os.path.join(d, f), "rb").read() for f in os.listdir(d)}
    vocab = tok.get_vocab_size()
    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25, pad_token_id=0,
                bos_token_id=2, eos_token_id=1, hidden_activation="gelu_pytorch_tanh", attn_implementation="eager")
    specs = [
        ("gemma2", Gemma2Config, Gemma2ForCausalLM,
         dict(num_hidden_layers=4, query_pre_attn_scalar=12, sliding_window=8, attn_logit_softcapping=6.0,
              final_logit_softcapping=4.0)),
        ("gemma3", Gemma3TextConfig, Gemma3ForCausalLM,
         dict(num_hidden_layers=6, query_pre_attn_scalar=16, sliding_window=6,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    ]
    ids = tok.encode(PROMPT, add_special_tokens=True).ids
    for i, (name, cls_cfg, cls_model, kw) in enumerate(specs):
        config = cls_cfg(**{**base, **kw})
        for attempt in range(50):
            torch.manual_seed(7000 + 100 * i + attempt)
            model = cls_model(config).eval().float()
            with torch.no_grad():
                # Norm weights start at 0 (the norms multiply by 1 + weight); perturb them so they matter.
                for n_, p in model.named_parameters():
                    if n_.endswith("norm.weight"):
                        p.copy_(0.1 * torch.randn_like(p))
            seq = list(ids)
            margins = []
            with torch.no_grad():
                for _ in range(GREEDY_STEPS):
                    logits = model(torch.tensor([seq])).logits[0, -1]
                    top = torch.topk(logits, 2).values
                    margins.append(float(top[0] - top[1]))
                    seq.append(int(torch.argmax(logits)))
            if min(margins) > 2e-2:
                break
        else:
            sys.exit(f"{name}: no seed gave clear greedy margins")
        with torch.no_grad():
            full_logits = model(torch.tensor([seq])).logits[0].float()
        directory = os.path.join(model_root, name)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        model.save_pretrained(directory, safe_serialization=True)
        for f, data in files.items():
            with open(os.path.join(directory, f), "wb") as out:
                out.write(data)
        with open(os.path.join(directory, "reference_logits.bin"), "wb") as f:
            f.write(full_logits.contiguous().numpy().astype("<f4").tobytes())
        ref = {"prompt": PROMPT, "prompt_ids": ids, "greedy_ids": seq[len(ids):], "rows": full_logits.shape[0],
               "vocab": full_logits.shape[1]}
        with open(os.path.join(directory, "reference.json"), "w") as f:
            json.dump(ref, f, indent=1)
        print(f"{name}: {len(ids)} prompt tokens, greedy margin {min(margins):.4f}, max |logit| {float(full_logits.abs().max()):.3f}")
    # Gemma's tokenizer.json differs from the others (no Prepend normalizer, a Split on " " before
    # BPE): its ids and decodings of the test strings, beside the Gemma 3 fixture.
    with open(os.path.join(model_root, "gemma3", "tokenizer_cases.json"), "w") as f:
        json.dump(tokenizer_cases(tok, "gemma"), f, ensure_ascii=False, indent=1)


def main():
    torch.set_num_threads(2)
    if sys.argv[1:] == ["--gemma"]:
        make_gemma_fixtures(os.path.join(ROOT, "models"))
        return
    phi3_only = "--phi3" in sys.argv[1:]
    keep = "--keep-tokenizers" in sys.argv[1:] or phi3_only
    tok_root = os.path.join(ROOT, "tokenizers")
    if sys.argv[1:2] == ["--moe-only"]:
        toks = {kind: Tokenizer.from_file(os.path.join(tok_root, kind, "tokenizer.json")) for kind in ["llama3", "qwen2"]}
        make_moe_models(toks, os.path.join(ROOT, "models"), only=sys.argv[2:])
        return
    if os.path.exists(tok_root) and not keep:
        shutil.rmtree(tok_root)
    toks = {}
    all_cases = {}
    for kind in TOKENIZER_KINDS:
        path = os.path.join(tok_root, kind)
        if keep and os.path.exists(os.path.join(path, "tokenizer.json")):
            tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        else:
            tok = train_sentencepiece_style(kind) if kind in ("llama2", "metaspace") else train_byte_level(kind)
            save_tokenizer(tok, kind, path)
        toks[kind] = tok
        all_cases[kind] = tokenizer_cases(tok, kind)
    with open(os.path.join(ROOT, "tokenizer_cases.json"), "w") as f:
        json.dump(all_cases, f, ensure_ascii=False, indent=1)
    if phi3_only:
        build_phi3_models(toks, os.path.join(ROOT, "models"))
        return
    if keep:
        return

    model_root = os.path.join(ROOT, "models")
    os.makedirs(model_root, exist_ok=True)
    specs = [
        # name, arch, config overrides, tokenizer kind
        ("llama", "llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                                rope_theta=500000.0), "llama3"),
        ("llama2", "llama", dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}), "llama2"),
        ("mistral", "mistral", dict(sliding_window=8, rope_theta=1000000.0), "metaspace"),
        ("qwen2", "qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0), "qwen2"),
        ("qwen3", "qwen3", dict(head_dim=32, num_key_value_heads=1, rope_theta=1000000.0, tie_word_embeddings=False), "qwen2"),
    ]
    for i, (name, arch, kw, kind) in enumerate(specs):
        model, ids, greedy, logits, margin = build_model(name, arch, kw, toks[kind], kind, seed=1000 * (i + 1))
        write_model(os.path.join(model_root, name), model, toks[kind], kind, ids, greedy, logits)
        print(f"{name}: {len(ids)} prompt tokens, greedy margin {margin:.4f}")
        if name == "llama":
            # 16-bit variants: the same weights rounded, with the reference computed two ways:
            # in f32 on the rounded weights (what Peregrine computes) and natively in 16 bits.
            for dtype, dname in [(torch.bfloat16, "bf16"), (torch.float16, "f16")]:
                m16 = LlamaForCausalLM(model.config).eval()
                m16.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
                with torch.no_grad():
                    seq = torch.tensor([ids + greedy])
                    ref32 = m16(seq).logits[0].float()
                    native = m16.to(dtype)(seq).logits[0].float()
                    m16.float()
                d = os.path.join(model_root, f"llama-{dname}")
                write_model(d, m16, toks[kind], kind, ids, greedy, ref32,
                            extra={"note": f"logits: f32 compute on {dname}-rounded weights"}, dtype=dtype)
                with open(os.path.join(d, "reference_logits_native.bin"), "wb") as f:
                    f.write(native.contiguous().numpy().astype("<f4").tobytes())
                # Greedy under f32 compute on rounded weights.
                with torch.no_grad():
                    seq2 = list(ids)
                    for _ in range(GREEDY_STEPS):
                        seq2.append(int(torch.argmax(m16.float()(torch.tensor([seq2])).logits[0, -1])))
                ref = json.load(open(os.path.join(d, "reference.json")))
                ref["greedy_ids_rounded_weights"] = seq2[len(ids):]
                json.dump(ref, open(os.path.join(d, "reference.json"), "w"), indent=1)
    build_phi3_models(toks, model_root)
    make_moe_models(toks, model_root)
    make_gemma_fixtures(model_root)


if __name__ == "__main__":
    main()
