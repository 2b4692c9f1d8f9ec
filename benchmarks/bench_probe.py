"""Probe training on cached features against this machine's bounds, measured in the same run.

The `cifar` protocol's probe of the four taps of the default CIFAR trunk, on 50,000 train /
10,000 test images (real CIFAR-10 when MONOSSL_DATA or ../shared/data has it, else random
images of the same shape: the timing does not depend on the content). Prints the probe-training
time (25 epochs, evaluation included; feature extraction excluded) beside two lower bounds
measured now:

  * memory: every epoch gathers the fp16 features of its minibatches (N x sum(D) x 2 bytes) and
    writes them once in the matmul dtype; at the bandwidth of a large tensor copy;
  * compute: the forward and weight-gradient matmuls (2 x 2 x N x sum(D) x classes FLOPs per
    epoch) at the rate of a large matmul in the probe's matmul dtype.

    python benchmarks/bench_probe.py [--epochs 25] [--n-train 50000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from monossl.data.datasets import load_pair
from monossl.data.image_sets import TensorImages
from monossl.eval.features import probe_matmul_dtype
from monossl.eval.probe import probe
from monossl.eval.protocols import get_protocol
from monossl.models import build_trunk


def copy_bytes_per_s(n_bytes=1 << 30, repeats=3) -> float:
    src = torch.ones(n_bytes // 2, dtype=torch.float16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * n_bytes * repeats / (time.perf_counter() - t0)  # read + write


def matmul_flops_per_s(dtype, n=2048, repeats=10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def cifar_or_random(n_train: int, n_test: int):
    try:
        train, test = load_pair("cifar10")
        return train.restricted(torch.arange(n_train)), test.restricted(torch.arange(n_test)), "CIFAR-10"
    except Exception:  # no CIFAR-10 here: random images of the same shape
        g = torch.Generator().manual_seed(0)
        make = lambda n: TensorImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                                      torch.arange(n) % 10, [str(i) for i in range(10)], "random")
        return make(n_train), make(n_test), "random images"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    args = p.parse_args()
    if "MONOSSL_DATA" not in os.environ and os.path.isdir("../shared/data"):
        os.environ["MONOSSL_DATA"] = "../shared/data"
    train, test, what = cifar_or_random(args.n_train, args.n_test)
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    protocol = get_protocol("cifar").with_overrides(epochs=args.epochs)
    result = probe(trunk, train, test, protocol, device="cpu", progress=False, verbose=False)
    dims = sum(t["pooled_size"] for t in result["taps"].values())
    dtype = probe_matmul_dtype(torch.device("cpu"))
    n, k = len(train), result["num_classes"]
    bw, flops = copy_bytes_per_s(), matmul_flops_per_s(dtype)
    mem_s = args.epochs * n * dims * (2 + dtype.itemsize) / bw
    compute_s = args.epochs * 4 * n * dims * k / flops
    train_s = result["timings"]["train_s"]
    print(f"data: {what}, {n} train / {len(test)} test, {len(result['taps'])} taps, {dims} features in all, "
          f"{args.epochs} epochs, matmuls in {result['matmul_dtype']}, {torch.get_num_threads()} threads")
    print(f"probe training (evaluation included): {train_s:.1f} s   [features: {result['timings']['extract_s']:.1f} s]")
    print(f"memory bound:  {mem_s:.1f} s at {bw / 1e9:.1f} GB/s (tensor copy)  -> {train_s / mem_s:.1f}x the bound")
    print(f"compute bound: {compute_s:.1f} s at {flops / 1e9:.0f} GFLOP/s ({str(dtype).replace('torch.', '')} matmul)"
          f"  -> {train_s / compute_s:.1f}x the bound")
    print(f"target <= 20 s: {'met' if train_s <= 20 else 'missed'}")


if __name__ == "__main__":
    main()
