#!/usr/bin/env python3
"""Writes a Qwen2-sized tokenizer.json (151,000 BPE entries and merges plus special tokens) for
measuring how fast Peregrine loads a large vocabulary. The merges are random but valid; the file
loads in the `tokenizers` library, which prints its own load time for comparison.

Run: python3 scripts/make_large_tokenizer.py OUT_DIR
"""
import json
import os
import random
import sys
import time

from tokenizers import Tokenizer, pre_tokenizers

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def random_bpe(size, seed=0):
    """A byte-level BPE vocabulary of `size` entries whose merges are random but valid: each new
    token is an earlier token with one byte symbol appended."""
    random.seed(seed)
    alpha = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alpha)}
    toks, merges = list(alpha), []
    while len(vocab) < size:
        a = random.choice(toks[-2000:] if len(toks) > 3000 and random.random() < 0.5 else toks)
        b = random.choice(alpha)
        if len(a) > 12 or a + b in vocab:
            continue
        vocab[a + b] = len(vocab)
        toks.append(a + b)
        merges.append(f"{a} {b}")
    return vocab, merges


def main(out):
    vocab, merges = random_bpe(151000)
    tj = json.load(open(os.path.join(ROOT, "models", "tokenizer", "tokenizer.json")))
    tj["model"]["vocab"] = vocab
    tj["model"]["merges"] = merges
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]
    tj["added_tokens"] = [dict(id=len(vocab) + i, content=c, single_word=False, lstrip=False, rstrip=False,
                               normalized=False, special=True) for i, c in enumerate(specials)]
    tj["post_processor"]["special_tokens"][specials[0]]["ids"] = [len(vocab)]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "tokenizer.json")
    json.dump(tj, open(path, "w"), ensure_ascii=False)
    t = time.time()
    Tokenizer.from_file(path)
    print(f"{path}: {len(vocab)} entries; tokenizers loads it in {time.time() - t:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/large-tokenizer")
