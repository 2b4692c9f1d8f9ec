"""Weighted k-NN (k = 20, 200) of four taps on full CIFAR-10 from cached features, against the
similarity matmul's own bound measured in the same run.

Extracts the `cifar` protocol's pooled features of a trunk (the random CIFAR trunk, or RUN's
trunk.pt) for 50,000 train / 10,000 test images once, untimed (the probe caches them anyway),
then times `knn_accuracy` on them at each feature size: the probe's own features and the
coarser grids of `knn_values` (eval/knn.py). Prints seconds, k20/k200 per tap, and the ratio to
the time the 10,000 x 50,000 x D similarity matmuls alone take at this machine's rate for a large
matmul in the same dtype (the bound: ranking and voting come on top).

    python benchmarks/bench_knn.py [--trunk RUN] [--values 0,2048,1024]
"""

from __future__ import annotations

import argparse
import time

import torch

from monossl.data.datasets import load_pair
from monossl.eval.features import pooled_features, pooled_shapes, probe_matmul_dtype
from monossl.eval.knn import coarser, knn_accuracy
from monossl.eval.protocols import get_protocol
from monossl.models import load_trunk, random_trunk


def matmul_flops_per_s(dtype, m=1024, n=16384, k=4096, repeats=3) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * n * k * repeats / (time.perf_counter() - t0)


@torch.no_grad()
def features(trunk, dataset, pools, chunk=512) -> dict[str, torch.Tensor]:
    parts = {k: [] for k in pools}
    for i in range(0, len(dataset), chunk):
        for k, v in pooled_features(trunk, dataset.images[i:i + chunk].float() / 255, pools).items():
            parts[k].append(v.half())
    return {k: torch.cat(v) for k, v in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trunk", default=None, help="a run directory (default: the random CIFAR trunk, seed 0)")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--values", default="0,2048,1024", help="knn_values to time (0: the probe's features)")
    args = parser.parse_args()

    trunk = (load_trunk(args.trunk)[0] if args.trunk else random_trunk("cifar", 0)).eval()
    protocol = get_protocol("cifar")
    shapes = pooled_shapes(trunk, protocol)
    train, test = load_pair(args.data)
    t0 = time.perf_counter()
    train_f, test_f = features(trunk, train, protocol.pools), features(trunk, test, protocol.pools)
    print(f"features of {len(train)} + {len(test)} images: {time.perf_counter() - t0:.1f} s (not timed below)")
    dtype = probe_matmul_dtype(torch.device("cpu"))
    rate = matmul_flops_per_s(dtype)
    print(f"matmul dtype {str(dtype).replace('torch.', '')}: {rate / 1e9:.0f} GFLOP/s on a large matmul")

    for values in (int(v) for v in args.values.split(",")):
        t0 = time.perf_counter()
        scores, dims = {}, {}
        for tap in protocol.pools:
            a, b = train_f[tap], test_f[tap]
            if values:
                grid = shapes[tap]["pooled_shape"]
                a, b = coarser(a, grid, values), coarser(b, grid, values)
            dims[tap] = a.shape[1]
            scores[tap] = knn_accuracy(a, train.labels, b, test.labels, dtype=dtype)
        seconds = time.perf_counter() - t0
        bound = 2 * len(train) * len(test) * sum(dims.values()) / rate
        name = f"knn_values {values}" if values else "probe features"
        print(f"{name}: {seconds:.1f} s for {len(dims)} taps (matmul bound {bound:.1f} s, "
              f"ratio {seconds / bound:.2f}x); sizes {dims}")
        for tap, s in scores.items():
            print(f"  {tap}: k20 {s['k20']:.2f}  k200 {s['k200']:.2f}")


if __name__ == "__main__":
    main()
