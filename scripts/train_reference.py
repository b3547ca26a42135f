#!/usr/bin/env python3
"""Trains Peregrine's reference models: a ~27M-parameter Llama target and a ~5M draft that
shares its tokenizer, on the corpus built by scripts/build_corpus.py.

Both are LlamaForCausalLM in the standard transformers layout (grouped-query attention, tied
embeddings, context 1024), saved with save_pretrained as bf16 safetensors. Training is seeded;
each model trains for a fixed number of steps (with a wall-clock guard, logged if it fires) and
keeps the weights with the lowest validation loss, measured every `eval_every` steps. The test
split is not read here.

Run on a GPU:  python3 scripts/train_reference.py --data .reference-data --out OUT
Smoke test on a CPU:  python3 scripts/train_reference.py --data .reference-data --out /tmp/x --smoke
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 8192
BOS, EOS = 8189, 8190  # <|begin_of_text|>, <|end_of_text|> (see models/tokenizer)
CONTEXT = 1024

MODELS = {
    # The corpus is small (6.7M tokens): the target needs dropout not to overfit within a few epochs.
    "target": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, steps=2600, lr=1.5e-3, batch=32, dropout=0.15),
    "draft": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, steps=2400, lr=3e-3, batch=32, dropout=0.0),
}


def config_for(spec):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                       num_hidden_layers=spec["num_hidden_layers"], num_attention_heads=spec["num_attention_heads"],
                       num_key_value_heads=spec["num_key_value_heads"], max_position_embeddings=CONTEXT,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=BOS,
                       eos_token_id=EOS, initializer_range=0.02, attn_implementation="sdpa")


def batches(data, batch, gen, device):
    n = len(data) - CONTEXT - 1
    while True:
        starts = torch.randint(0, n, (batch,), generator=gen)
        x = torch.stack([torch.from_numpy(data[s:s + CONTEXT + 1].astype(np.int64)) for s in starts.tolist()])
        yield x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, val, device, windows=48, batch=16):
    """Mean next-token loss over fixed, evenly spaced validation windows."""
    model.eval()
    n = len(val) - CONTEXT - 1
    starts = np.linspace(0, n, windows).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, windows, batch):
        x = torch.stack([torch.from_numpy(val[s:s + CONTEXT + 1].astype(np.int64)) for s in starts[i:i + batch]]).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += x[:, 1:].numel()
    model.train()
    return total / count


def train(name, spec, train_data, val_data, device, args):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + (0 if name == "target" else 1))
    model = LlamaForCausalLM(config_for(spec)).to(device)
    if spec["dropout"] > 0:
        # Residual dropout on each attention and MLP output, in training only (transformers'
        # Llama has none); the saved model is unchanged.
        p = spec["dropout"]
        for layer in model.model.layers:
            layer.mlp.register_forward_hook(lambda m, i, o: torch.nn.functional.dropout(o, p, m.training))
            layer.self_attn.register_forward_hook(
                lambda m, i, o: (torch.nn.functional.dropout(o[0], p, m.training),) + tuple(o[1:]))
    params = sum(p.numel() for p in model.parameters())
    steps = args.smoke_steps if args.smoke else spec["steps"]
    batch = 2 if args.smoke else spec["batch"]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return spec["lr"] * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return spec["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    it = batches(train_data, batch, gen, device)
    best = (float("inf"), None, 0)
    log = []
    start = time.time()
    tokens = 0
    eval_every = max(1, steps // 24)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x = next(it)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += x[:, 1:].numel()
        last = step == steps - 1
        over = time.time() - start > args.budget[name]
        if (step + 1) % eval_every == 0 or last or over:
            v = evaluate(model, val_data, device, windows=4 if args.smoke else 48)
            entry = {"step": step + 1, "tokens": tokens, "train_loss": float(loss.detach()), "val_loss": v,
                     "seconds": round(time.time() - start, 1)}
            log.append(entry)
            print(name, json.dumps(entry), flush=True)
            if v < best[0]:
                best = (v, {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}, step + 1)
        if over:
            print(f"{name}: wall-clock guard stopped training at step {step + 1} of {steps}", flush=True)
            break
    model.load_state_dict(best[1])
    summary = {"parameters": params, "steps_run": log[-1]["step"], "steps_planned": steps, "best_step": best[2],
               "best_val_loss": best[0], "tokens_seen": tokens, "train_seconds": round(time.time() - start, 1),
               "batch": batch, "context": CONTEXT, "dropout": spec["dropout"], "lr": spec["lr"], "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "log": log}
    return model, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smoke", action="store_true", help="a few tiny steps, to check the script on a CPU")
    ap.add_argument("--smoke-steps", type=int, default=3)
    ap.add_argument("--target-seconds", type=float, default=330)
    ap.add_argument("--draft-seconds", type=float, default=120)
    ap.add_argument("--only", choices=list(MODELS), help="train just one of the models")
    args = ap.parse_args()
    args.budget = {"target": args.target_seconds, "draft": args.draft_seconds}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    train_data = np.fromfile(os.path.join(args.data, "train.bin"), dtype=np.uint16)
    val_data = np.fromfile(os.path.join(args.data, "validation.bin"), dtype=np.uint16)
    assert train_data.max() < VOCAB and val_data.max() < VOCAB
    print(f"train tokens {len(train_data)}, validation tokens {len(val_data)}, device {device}", flush=True)
    report = {}
    for name, spec in MODELS.items():
        if args.only and name != args.only:
            continue
        model, summary = train(name, spec, train_data, val_data, device, args)
        out = os.path.join(args.out, name)
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        report[name] = summary
        print(name, {k: v for k, v in summary.items() if k != "log"}, flush=True)
    with open(os.path.join(args.out, "train_report.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
