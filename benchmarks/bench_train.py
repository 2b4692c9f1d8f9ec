"""RotNet training throughput on the CIFAR trunk, as a fraction of this machine's matmul FLOP rate.

Both are measured in the same run: the FLOPs of one training step are counted by
torch's FlopCounterMode, the step is timed, and a large fp32 matrix multiply gives the
machine's attainable FLOP rate. Prints images/s, GFLOP/s and the ratio (target >= 40%).

    python benchmarks/bench_train.py [--batch-size 64] [--steps 10] [--arch cifar]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from monossl.device import memory_format
from monossl.methods.rotnet import RotNet
from monossl.models import build_trunk


def matmul_flops_per_s(n=2048, repeats=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def step_flops(method, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        method.step(batch, 0)
    return counter.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="cifar")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (x4 rotations)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--widths", default=None, help="CIFAR trunk widths, e.g. 32,64,128,256")
    p.add_argument("--contiguous", action="store_true", help="NCHW instead of channels-last")
    args = p.parse_args()

    torch.manual_seed(0)
    config = {"widths": [int(w) for w in args.widths.split(",")]} if args.widths else {}
    trunk = build_trunk(args.arch, **config)
    method = RotNet(trunk, total_steps=10**6)
    fmt = torch.contiguous_format if args.contiguous else memory_format(torch.device("cpu"))
    method.to(memory_format=fmt)
    size = trunk.input_size
    batch = {"images": torch.rand(args.batch_size, 3, size, size).contiguous(memory_format=fmt)}
    flops = step_flops(method, batch)
    for _ in range(2):
        method.step(batch, 0)  # warm-up (oneDNN picks its kernels)
    t0 = time.perf_counter()
    for i in range(args.steps):
        method.step(batch, i)
    dt = (time.perf_counter() - t0) / args.steps
    peak = matmul_flops_per_s()
    achieved = flops / dt
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"arch {args.arch}, batch {args.batch_size} images ({4 * args.batch_size} rotated samples), "
          f"{'NCHW' if args.contiguous else 'channels-last'}")
    print(f"RotNet training: {args.batch_size / dt:.1f} images/s ({4 * args.batch_size / dt:.1f} samples/s), "
          f"{flops / 1e9:.2f} GFLOP per step, {achieved / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s")
    print(f"ratio achieved/matmul: {achieved / peak:.1%} (target >= 40%)")


if __name__ == "__main__":
    main()
