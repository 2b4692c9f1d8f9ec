"""Probe training on cached features against this machine's bounds, measured in the same run.

The `cifar` protocol's probe of the four taps of the default CIFAR trunk, on 50,000 train /
10,000 test images (real CIFAR-10 when MONOSSL_DATA or ../shared/data has it, else random
images of the same shape: the timing does not depend on the content). Prints the probe-training
time (25 epochs, each followed by an evaluation on test, included; feature extraction excluded)
beside two lower bounds measured now (each rate the best of a few repeats), for the matmul dtype
that ran: bf16 where the CPU does it, fp32 with --fp32 or elsewhere. With N train and M test
images, S = 17,408 features (the four taps' sizes summed), K = 10 classes and E epochs:

  * memory: E x (N x S x (2 + b) + M x S x (2 + c)) bytes at the bandwidth of a large tensor copy
    (bytes read + written). Every epoch reads each cached 16-bit training feature once and writes
    it once as the matmul's operand (b = 2 for bf16, the gathered minibatch; b = 4 for fp32, fp16
    converted), and every evaluation reads the test cache (c = 0 for bf16, read as it is; c = 4
    for fp32, converted). This is the least a gather-then-matmul must move (a fused
    gather-and-convert would reach it; the fp32 path gathers fp16 rows first: 2 + 2 + 2 + 4 bytes).
  * compute: E x (4 x N + 2 x M) x S x K FLOPs (the forward and weight-gradient matmuls of
    training, the forward of evaluation) at the rate of a 2048^3 matmul in the same dtype and
    with the same threads.

    python benchmarks/bench_probe.py [--fp32] [--epochs 25] [--n-train 50000] [--n-test 10000]

--fp32 forces the fp32 path (probe(..., matmul_dtype=torch.float32); MONOSSL_PROBE_BF16=0 does
the same) on a machine with bf16, to time what a CPU without bf16 runs. The last line checks the
targets: bf16 <= 20 s, fp32 <= 3x the larger bound. On a machine other jobs share, two spinning
OpenMP threads make the probe's many small operations far slower than a big copy or matmul (the
bounds): compare runs with OMP_NUM_THREADS=1 there (docs/probes.md, "The fp32 path").
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from monossl.data.datasets import load_pair
from monossl.data.image_sets import TensorImages
from monossl.eval.probe import probe
from monossl.eval.protocols import get_protocol
from monossl.models import build_trunk


def best_seconds(fn, repeats) -> float:
    """The fastest of `repeats` calls (after a warm-up): the rate least disturbed by other work."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bytes_per_s(n_bytes=1 << 30, repeats=5) -> float:
    src = torch.ones(n_bytes // 2, dtype=torch.float16)
    dst = torch.empty_like(src)
    return 2 * n_bytes / best_seconds(lambda: dst.copy_(src), repeats)  # read + write


def matmul_flops_per_s(dtype, n=2048, repeats=10) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, repeats)


def cifar_or_random(n_train: int, n_test: int):
    try:
        train, test = load_pair("cifar10")
        return train.restricted(torch.arange(n_train)), test.restricted(torch.arange(n_test)), "CIFAR-10"
    except Exception:  # no CIFAR-10 here: random images of the same shape
        g = torch.Generator().manual_seed(0)

        def make(n: int) -> TensorImages:
            return TensorImages(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                                torch.arange(n) % 10, [str(i) for i in range(10)], "random")

        return make(n_train), make(n_test), "random images"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp32", action="store_true", help="force fp32 matmuls (the path of CPUs without bf16)")
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
    result = probe(trunk, train, test, protocol, device="cpu", progress=False, verbose=False,
                   matmul_dtype=torch.float32 if args.fp32 else "auto")
    dims = sum(t["pooled_size"] for t in result["taps"].values())
    dtype = getattr(torch, result["matmul_dtype"])
    n, m, k = len(train), len(test), result["num_classes"]
    evals = sum("top1" in h for h in result["history"])
    bw, flops = copy_bytes_per_s(), matmul_flops_per_s(dtype)
    convert = dtype.itemsize if dtype.itemsize != 2 else 0  # the 16-bit cache read as it is, or converted
    mem_s = (args.epochs * n * dims * (2 + dtype.itemsize) + evals * m * dims * (2 + convert)) / bw
    compute_s = (args.epochs * 4 * n + evals * 2 * m) * dims * k / flops
    train_s = result["timings"]["train_s"]
    name = result["matmul_dtype"]
    print(f"data: {what}, {n} train / {m} test, {len(result['taps'])} taps, {dims} features in all, "
          f"{args.epochs} epochs ({evals} evaluated), matmuls in {name}, {torch.get_num_threads()} threads")
    print(f"probe training (evaluation included): {train_s:.1f} s   [evaluation {result['timings']['eval_s']:.1f} s; "
          f"features: {result['timings']['extract_s']:.1f} s]")
    print(f"memory bound:  {mem_s:.1f} s at {bw / 1e9:.1f} GB/s (tensor copy)  -> {train_s / mem_s:.1f}x the bound")
    print(f"compute bound: {compute_s:.1f} s at {flops / 1e9:.0f} GFLOP/s ({name} matmul)"
          f"  -> {train_s / compute_s:.1f}x the bound")
    if dtype == torch.float32:
        ratio = train_s / max(mem_s, compute_s)
        print(f"target <= 3x the larger bound: {ratio:.2f}x, {'met' if ratio <= 3 else 'missed'}")
    else:
        print(f"target <= 20 s: {'met' if train_s <= 20 else 'missed'}")


if __name__ == "__main__":
    main()
