#!/usr/bin/env python3
"""Evaluates the reference models with transformers and writes the target's parity fixture.

- Perplexity of target and draft on the validation and test splits: the split is tokenized as
  the training data is (documents wrapped in BOS ... EOS), cut into non-overlapping windows of
  1024 tokens, every token after the first of a window scored.
- Draft agreement: how often the draft's greedy next token equals the target's, over the same
  test windows (teacher-forced on the test text).
- Tests/Fixtures/reference-target/: a prompt, transformers' greedy continuation, and its f32
  logits (the bf16 weights computed in f32) for the last prompt position and each generated one.

Run: python3 scripts/eval_reference.py   (CPU is enough; writes models/training/eval.json)
"""
import json
import os
import time

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import LlamaForCausalLM

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
MODELS = os.path.join(ROOT, "models")
FIXTURE = os.path.join(ROOT, "Tests", "Fixtures", "reference-target")
WINDOW = 1024
PROMPT = "The Lord said unto Moses,"
STEPS = 24


def split_tokens(tok, name):
    text = open(os.path.join(MODELS, "corpus", f"{name}.txt"), encoding="utf-8").read().rstrip("\n")
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    ids = []
    for doc in text.split("\n\n\n"):
        ids += [bos] + tok.encode(doc, add_special_tokens=False).ids + [eos]
    return ids


def load(name):
    return LlamaForCausalLM.from_pretrained(os.path.join(MODELS, name), dtype=torch.float32).eval()


@torch.no_grad()
def evaluate(models, ids):
    n = (len(ids) - 1) // WINDOW
    nll = {k: 0.0 for k in models}
    agree, scored = 0, 0
    for w in range(n):
        x = torch.tensor([ids[w * WINDOW:(w + 1) * WINDOW]])
        preds = {}
        for k, m in models.items():
            logits = m(x).logits[0, :-1].float()
            nll[k] += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            preds[k] = logits.argmax(-1)
        if "draft" in preds:
            agree += int((preds["draft"] == preds["target"]).sum())
        scored += WINDOW - 1
    out = {k: {"perplexity": float(np.exp(v / scored)), "tokens_scored": scored} for k, v in nll.items()}
    return out, agree / scored


def main():
    torch.set_num_threads(os.cpu_count())
    tok = Tokenizer.from_file(os.path.join(MODELS, "tokenizer", "tokenizer.json"))
    models = {"target": load("target"), "draft": load("draft")}
    report = {}
    for split in ("validation", "test"):
        t0 = time.time()
        ppl, agreement = evaluate(models, split_tokens(tok, split))
        report[split] = {"perplexity": ppl, "draft_greedy_agreement": agreement}
        print(split, json.dumps(report[split]), f"{time.time() - t0:.0f} s", flush=True)
    with open(os.path.join(MODELS, "training", "eval.json"), "w") as f:
        json.dump(report, f, indent=1)

    # Parity fixture for the Swift engine.
    target = models["target"]
    prompt_ids = tok.encode(PROMPT).ids
    seq = list(prompt_ids)
    rows = []
    with torch.no_grad():
        for _ in range(STEPS):
            logits = target(torch.tensor([seq])).logits[0, -1].float()
            rows.append(logits)
            seq.append(int(logits.argmax()))
    os.makedirs(FIXTURE, exist_ok=True)
    np.stack([r.numpy() for r in rows]).astype("<f4").tofile(os.path.join(FIXTURE, "reference_logits.bin"))
    greedy = seq[len(prompt_ids):]
    with open(os.path.join(FIXTURE, "reference.json"), "w") as f:
        json.dump({"prompt": PROMPT, "prompt_ids": prompt_ids, "greedy_ids": greedy,
                   "greedy_text": tok.decode(greedy, skip_special_tokens=True), "rows": len(rows),
                   "vocab": int(rows[0].shape[0]),
                   "note": "row i: logits after prompt + greedy[:i], f32 compute on the bf16 weights"}, f, indent=1)
    print("greedy:", repr(tok.decode(greedy, skip_special_tokens=True)))


if __name__ == "__main__":
    main()
