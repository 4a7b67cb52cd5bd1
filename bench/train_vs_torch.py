#!/usr/bin/env python3
"""One training step, chatforge vs PyTorch eager (fp32 and bf16 autocast), on the same model and machine.
chatforge runs fp32 and, on CPUs with a bf16 kernel (AMX or AVX512-BF16), `--precision auto` (its
mixed precision); the kernel that ran is printed.

The PyTorch side builds the model `chatforge bench train` builds (Llama family: RMSNorm, rotary
embeddings, multi-head attention through scaled_dot_product_attention, SwiGLU, tied embeddings) and
times the same step on random tokens: forward, cross-entropy, backward, gradient clipping, AdamW.
Both report the median of --steps steps after --warmup, model GFLOP/s, and the fp32 (and for
PyTorch bf16) matmul ceilings of the machine, so each number is also a fraction of a ceiling.

    pip install torch
    python3 bench/train_vs_torch.py [--threads 2] [--steps 10] [--layers 6 --width 384 ...]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time


def step_flops(a):
    hd = a.width // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    per_layer = a.width * (q + 2 * kv) + q * a.width + 3 * a.width * a.ffn
    matrices = a.layers * per_layer + a.vocab * a.width
    tokens = a.batch * a.context
    attention = a.layers * 4 * a.context * q * tokens
    return 3 * (2 * matrices * tokens + attention)


def torch_matmul(torch, dtype, n=1024, repeats=10):
    x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x @ y
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def llama(torch, a, smear=False):
    """chatforge's model in PyTorch (Llama family: RMSNorm, rotary embeddings, grouped-query attention
    through scaled_dot_product_attention, SwiGLU, tied embeddings), initialised as chatforge does.
    `a` has vocab, width, layers, heads, kv_heads, ffn. With `smear`, each position also gets the
    previous token's embedding through a learned gate (modded-nanogpt's smear), which chatforge
    does not have: an experiment of docs/CURRICULUM.md's."""
    import torch.nn as nn
    import torch.nn.functional as F

    V, C, L, H, KV, FF = a.vocab, a.width, a.layers, a.heads, a.kv_heads, a.ffn
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
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            x = x + self.o(att.transpose(1, 2).reshape(b, t, C))
            h = self.n2(x)
            return x + self.d(F.silu(self.g(h)) * self.u(h))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.norm = nn.RMSNorm(C, eps=1e-5)
            self.smear = nn.Linear(C, 1) if smear else None

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], dtype=torch.float32)
            inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
            ang = pos[:, None] * inv[None, :]
            cos, sin = ang.cos(), ang.sin()
            x = self.emb(ids)
            if self.smear is not None:
                gate = torch.sigmoid(self.smear(x[:, 1:]))
                x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], 1)
            for blk in self.blocks:
                x = blk(x, cos, sin)
            return self.norm(x) @ self.emb.weight.t()

    model = Model()
    # chatforge's initialisation (normal, std 0.02): PyTorch's default N(0, 1) embedding, tied to the
    # head, starts the loss near 370 and slows later steps several-fold.
    with torch.no_grad():
        for prm in model.parameters():
            if prm.dim() >= 2:
                prm.normal_(0.0, 0.02)
    return model


def torch_train(torch, a, bf16, ddp=False):
    """Median seconds per step; with `ddp`, as one rank of an initialised process group, wrapped in
    DistributedDataParallel and training on its slice of each global batch of `a.batch` rows."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    V, T = a.vocab, a.context
    model = llama(torch, a)
    rows = slice(None)
    if ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        per_rank = a.batch // dist.get_world_size()
        rows = slice(dist.get_rank() * per_rank, (dist.get_rank() + 1) * per_rank)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        w = torch.randint(0, V, (a.batch, T + 1), generator=g)[rows]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, V), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("layers", 6), ("width", 384), ("heads", 6), ("kv-heads", 6), ("ffn", 1024),
                          ("context", 256), ("vocab", 8192), ("batch", 8), ("steps", 10), ("warmup", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--binary", default="target/release/chatforge")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args()
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    shape = ["--layers", str(a.layers), "--width", str(a.width), "--heads", str(a.heads),
             "--kv-heads", str(a.kv_heads), "--ffn", str(a.ffn), "--context", str(a.context),
             "--vocab", str(a.vocab), "--batch", str(a.batch), "--steps", str(a.steps),
             "--warmup", str(a.warmup), "--json"]
    ours = json.loads(subprocess.run([a.binary, "bench", "train", *shape, "--precision", "f32"], check=True, env=env,
                                     capture_output=True, text=True).stdout)
    mm = json.loads(subprocess.run([a.binary, "bench", "matmul", "--json"], check=True, env=env,
                                   capture_output=True, text=True).stdout)
    our_mm, our_mm16 = mm["gflop_per_second"], mm.get("bf16_gflop_per_second")
    # Mixed precision on the fastest bf16 kernel, where the CPU has one.
    ours16 = None
    if our_mm16:
        ours16 = json.loads(subprocess.run([a.binary, "bench", "train", *shape, "--precision", "auto"], check=True,
                                           env=env, capture_output=True, text=True).stdout)
    try:
        import torch
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch")
    torch.set_num_threads(a.threads)
    flops = step_flops(a) / 1e9
    tokens = a.batch * a.context
    mm32, mm16 = torch_matmul(torch, torch.float32), torch_matmul(torch, torch.bfloat16)
    t32 = torch_train(torch, a, bf16=False)
    t16 = torch_train(torch, a, bf16=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = [(f"chatforge {ours['matmul_kernel']}", ours["median_step_seconds"], our_mm, ours["peak_rss_mb"]),
            (f"PyTorch {torch.__version__} fp32", t32, mm32, None),
            ("PyTorch bf16 autocast", t16, mm16, None)]
    if ours16:
        rows.insert(1, (f"chatforge auto: {ours16['matmul_kernel']}", ours16["median_step_seconds"], our_mm16,
                        ours16["peak_rss_mb"]))
    print(f"training step: {a.layers} layers, width {a.width}, {a.heads} heads ({a.kv_heads} kv), ffn {a.ffn}, "
          f"context {a.context}, vocab {a.vocab}, batch {a.batch}; {a.threads} threads; median of {a.steps} steps")
    print("| implementation | s/step | tokens/s | GFLOP/s | matmul ceiling GFLOP/s | fraction of ceiling |")
    print("|---|---|---|---|---|---|")
    for name, s, ceiling, _ in rows:
        print(f"| {name} | {s:.3f} | {tokens / s:,.0f} | {flops / s:.1f} | {ceiling:.0f} | {flops / s / ceiling:.2f} |")
    print(f"| chatforge / PyTorch fp32 | {t32 / ours['median_step_seconds']:.2f}x | | | | |")
    print(f"| chatforge fp32 / PyTorch bf16 | {t16 / ours['median_step_seconds']:.2f}x | | | | |")
    if ours16:
        print(f"| chatforge auto / PyTorch bf16 | {t16 / ours16['median_step_seconds']:.2f}x | | | | |")
        print(f"| chatforge auto / PyTorch fp32 | {t32 / ours16['median_step_seconds']:.2f}x | | | | |")
    if ours16:
        print(f"bf16 loss after {a.steps} steps: chatforge {ours16['losses'][-1]:.3f} vs its fp32 "
              f"{ours['losses'][-1]:.3f}")
    print(f"peak RSS: chatforge {ours['peak_rss_mb']:.0f} MB, PyTorch (both runs, one process) {rss:.0f} MB; "
          f"chatforge at {flops / ours['median_step_seconds'] / mm32:.2f} of PyTorch's fp32 matmul ceiling")
    if a.json:
        json.dump({"chatforge": ours, "chatforge_bf16": ours16, "chatforge_matmul_gflops": our_mm,
                   "chatforge_matmul_bf16_gflops": our_mm16, "torch_fp32_s": t32, "torch_bf16_s": t16,
                   "torch_matmul_fp32_gflops": mm32, "torch_matmul_bf16_gflops": mm16, "torch_peak_rss_mb": rss,
                   "gflop_per_step": flops}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
