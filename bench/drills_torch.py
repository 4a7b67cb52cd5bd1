#!/usr/bin/env python3
"""The lookup drills of docs/CURRICULUM.md trained in PyTorch, beside `chatforge pretrain`: does the
same model on the same tokens learn to match a key to its value where chatforge does not?

  bench/drills_torch.py train --data SHARDS --config CONFIG --out DIR --steps N --save 100,300
                              [--smear] [--lr 3e-3] [--warmup 30] [--seed 1337] [--threads 2]
      Trains bench/train_vs_torch.py's model (chatforge's, from a Hugging Face config.json) on
      random windows of a `chatforge tokenize` shard directory with `chatforge pretrain`'s
      recipe: batch 16 × 256, AdamW (0.9, 0.95), weight decay 0.1 on matrices, linear warmup,
      cosine to a tenth, gradients clipped at 1. At each --save step it writes DIR/stepN as a
      Hugging Face directory that `chatforge eval` and bench/reading_probe.py load (a --smear
      model adds tensors chatforge does not know: probe it with this script).
  bench/drills_torch.py probe --model DIR [--keys invented|words] [--layout plain|labelled]
      bench/reading_probe.py's drill probe, scored in PyTorch.

    pip install torch safetensors tokenizers numpy
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reading_probe  # noqa: E402
from train_vs_torch import llama  # noqa: E402

# chatforge's parameter names in Hugging Face form, against the PyTorch model's.
BLOCK_NAMES = [("n1", "input_layernorm"), ("n2", "post_attention_layernorm"),
               ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
               ("o", "self_attn.o_proj"), ("g", "mlp.gate_proj"), ("u", "mlp.up_proj"),
               ("d", "mlp.down_proj")]


def shape(config):
    c = json.load(open(config))
    # bench/train_vs_torch.py's model fixes these; another value would train a different model.
    fixed = {"rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu"}
    for key, value in fixed.items():
        if c.get(key, value) != value:
            sys.exit(f"{config}: {key} is {c[key]!r}; this script's model has {value!r} (the small preset's)")
    return argparse.Namespace(vocab=c["vocab_size"], width=c["hidden_size"], layers=c["num_hidden_layers"],
                              heads=c["num_attention_heads"], kv_heads=c["num_key_value_heads"],
                              ffn=c["intermediate_size"])


def named(model):
    out = {"model.embed_tokens.weight": model.emb.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        for ours, hf in BLOCK_NAMES:
            out[f"model.layers.{i}.{hf}.weight"] = getattr(block, ours).weight
    if model.smear is not None:
        out.update({"smear.weight": model.smear.weight, "smear.bias": model.smear.bias})
    return out


def train(a):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    dtype = np.uint16 if meta["token_size"] == 2 else np.uint32
    # A shard is a 32-byte header, then the tokens (src/data/shards.rs).
    shards = [torch.from_numpy(np.fromfile(os.path.join(a.data, f), dtype=dtype, offset=32).astype(np.int64))
              for f in meta["train"]["files"]]
    shards = [s for s in shards if len(s) > a.seq_len + 1]
    # Windows stay inside one shard, which is drawn by its size, as `chatforge pretrain` draws them.
    sizes = torch.tensor([float(len(s) - a.seq_len - 1) for s in shards])
    model = llama(torch, shape(a.config), smear=a.smear)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    saves = {int(s) for s in a.save.split(",")} | {a.steps}

    def rate(i):
        if i < a.warmup:
            return a.lr * (i + 1) / a.warmup
        done = (i - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

    g = torch.Generator().manual_seed(a.seed)
    start = time.time()
    for i in range(a.steps):
        which = torch.multinomial(sizes, a.batch, replacement=True, generator=g)
        windows = torch.stack([
            shards[w][s:s + a.seq_len + 1]
            for w, s in ((int(w), int(torch.randint(0, int(sizes[w]), (1,), generator=g))) for w in which)
        ])
        for group in opt.param_groups:
            group["lr"] = rate(i)
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if i % 50 == 0:
            print(f"step {i:5d}: loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
        if i + 1 in saves:
            out = os.path.join(a.out, f"step{i + 1}")
            os.makedirs(out, exist_ok=True)
            tensors = {k: v.detach().contiguous().clone() for k, v in named(model).items()}
            save_file(tensors, os.path.join(out, "model.safetensors"))
            shutil.copy(a.config, os.path.join(out, "config.json"))
            shutil.copy(os.path.join(a.data, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
            print(f"wrote {out}", flush=True)


def probe(a):
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    weights = load_file(os.path.join(a.model, "model.safetensors"))
    model = llama(torch, shape(os.path.join(a.model, "config.json")), smear="smear.weight" in weights)
    with torch.no_grad():
        for name, p in named(model).items():
            p.copy_(weights[name])
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    bos = tok.token_to_id("<|bos|>")
    items = list(reading_probe.drill_items(random.Random(a.seed), a.items, a.keys, a.layout))
    right = in_context = 0
    with torch.no_grad():
        for context, candidates, answer, shown in items:
            n = len(tok.encode(context, add_special_tokens=False).ids)
            scores = []
            for c in candidates:
                ids = [bos] + tok.encode(context + " " + c, add_special_tokens=False).ids
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
                scores.append(sum(logp[i - 1, ids[i]].item() for i in range(1 + n, len(ids))))
            best = candidates[max(range(len(candidates)), key=scores.__getitem__)]
            right += best == answer
            in_context += best in shown
    print(json.dumps({"model": a.model, "keys": a.keys, "layout": a.layout, "items": len(items),
                      "right": round(right / len(items), 3), "from_context": round(in_context / len(items), 3)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--config", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--save", default="")
    t.add_argument("--smear", action="store_true")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("probe")
    p.add_argument("--model", required=True)
    p.add_argument("--keys", choices=["invented", "words"], default="invented")
    p.add_argument("--layout", choices=["plain", "labelled"], default="plain")
    p.add_argument("--items", type=int, default=150)
    p.add_argument("--seed", type=int, default=5)
    a = ap.parse_args()
    if a.cmd == "train":
        a.save = a.save or str(a.steps)
        train(a)
    else:
        probe(a)


if __name__ == "__main__":
    sys.exit(main())
