#!/usr/bin/env python3
"""Side-by-side pretraining throughput: chatforge vs PyTorch on the same model, data and machine.

The PyTorch side builds the same Llama-style model chatforge trains by default (RMSNorm, rotary
embeddings, grouped-query attention via scaled_dot_product_attention, SwiGLU, tied embeddings), reads
random windows from the same token shards and takes AdamW steps with the same hyperparameters.

    pip install torch numpy
    cargo build --release
    python3 bench/pretrain_vs_torch.py --shards runs/speedrun/shards [--steps 20] [--threads 2]

Prints tokens/s and peak memory for each, and chatforge's ratio to PyTorch.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def torch_side(args, meta):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    V, C, L, H, KV, FF, T = meta["vocab_size"], 192, 4, 6, 2, 512, args.seq_len
    D = C // H

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.RMSNorm(C, eps=1e-5), nn.RMSNorm(C, eps=1e-5)
            self.q, self.k = nn.Linear(C, H * D, bias=False), nn.Linear(C, KV * D, bias=False)
            self.v, self.o = nn.Linear(C, KV * D, bias=False), nn.Linear(H * D, C, bias=False)
            self.g, self.u = nn.Linear(C, FF, bias=False), nn.Linear(C, FF, bias=False)
            self.d = nn.Linear(FF, C, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            h = self.n1(x)
            q = self.q(h).view(b, t, H, D).transpose(1, 2)
            k = self.k(h).view(b, t, KV, D).transpose(1, 2)
            v = self.v(h).view(b, t, KV, D).transpose(1, 2)

            def rope(z):
                z1, z2 = z[..., : D // 2], z[..., D // 2 :]
                return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

            q, k = rope(q), rope(k)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, C))
            h = self.n2(x)
            return x + self.d(F.silu(self.g(h)) * self.u(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.norm = nn.RMSNorm(C, eps=1e-5)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], dtype=torch.float32)
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
            ang = pos[:, None] * inv[None, :]
            cos, sin = ang.cos(), ang.sin()
            x = self.emb(ids)
            for b in self.blocks:
                x = b(x, cos, sin)
            return self.norm(x) @ self.emb.weight.t()

    model = Model()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95),
    )
    path = os.path.join(args.shards, meta["train"]["files"][0])
    dtype = np.uint16 if meta["token_size"] == 2 else np.uint32
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=32)
    rng = np.random.default_rng(0)

    def step():
        starts = rng.integers(0, len(tokens) - T - 1, args.batch_size)
        w = torch.from_numpy(np.stack([tokens[s : s + T + 1].astype(np.int64) for s in starts]))
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return args.steps * args.batch_size * T / secs, rss, torch.__version__


def chatforge_side(args):
    with tempfile.TemporaryDirectory() as out:
        run = os.path.join(out, "run")
        cmd = [args.binary, "pretrain", "--data", args.shards, "--out", run,
               "--steps", str(args.steps + 2), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--eval-every", "1000000",
               "--checkpoint-every", "1000000", "--eval-tokens", "256"]
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in l]
        # Throughput over the steps after the first log line, to leave out start-up.
        a, b = rows[0], rows[-1]
        tps = (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])
        return tps, rss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--binary", default="target/release/chatforge")
    args = p.parse_args()
    meta = json.load(open(os.path.join(args.shards, "meta.json")))
    cf_tps, cf_rss = chatforge_side(args)
    try:
        pt_tps, pt_rss, version = torch_side(args, meta)
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch numpy")
    print(f"pretraining step, batch {args.batch_size} x {args.seq_len}, {args.threads} threads, "
          f"vocab {meta['vocab_size']}, default chatforge model")
    print("| | tokens/s | peak RSS MiB |")
    print("|---|---|---|")
    print(f"| chatforge | {cf_tps:,.0f} | {cf_rss:,.0f} |")
    print(f"| PyTorch {version} | {pt_tps:,.0f} | {pt_rss:,.0f} |")
    print(f"| ratio chatforge/PyTorch | {cf_tps / pt_tps:.2f}x | {cf_rss / pt_rss:.2f}x |")


if __name__ == "__main__":
    main()
