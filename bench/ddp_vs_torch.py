#!/usr/bin/env python3
"""PyTorch DistributedDataParallel (gloo, on this host) on the model bench/train_vs_torch.py builds:
RANKS processes of 1 thread each, each training on its slice of every global batch; prints the
median seconds per step of rank 0 for fp32 and bf16 autocast as JSON. bench/data_parallel.sh runs
it beside chatforge under mpirun.

    python3 bench/ddp_vs_torch.py --ranks 2 --layers 6 --width 256 ... --batch 16
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_vs_torch import torch_train  # noqa: E402


def worker(rank, a, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    times = {name: torch_train(torch, a, bf16, ddp=True) for name, bf16 in [("fp32", False), ("bf16", True)]}
    if rank == 0:
        out.put(times)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("layers", 6), ("width", 256), ("heads", 8), ("kv-heads", 4), ("ffn", 704),
                          ("context", 256), ("vocab", 2048), ("batch", 16), ("steps", 10), ("warmup", 2),
                          ("ranks", 2)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(worker, args=(a, out), nprocs=a.ranks, join=True, start_method="spawn")
    times = out.get()
    json.dump({"torch": __import__("torch").__version__, "ranks": a.ranks, "fp32_s": times["fp32"],
               "bf16_s": times["bf16"]}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
