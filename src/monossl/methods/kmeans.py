"""k-means with faiss on every point, as DeepCluster runs it each epoch (and benchmarks/bench_kmeans.py)."""

from __future__ import annotations

import time

import numpy as np
import torch

from monossl.errors import UserError

KMEANS_INITS = ("random", "k-means++", "afk-mc2")


def run_kmeans(x: torch.Tensor | np.ndarray, k: int, seed: int, niter: int = 20,
               init: str = "afk-mc2") -> tuple[np.ndarray, dict]:
    """faiss k-means on x (n, d) float32; returns (labels int64 (n,), stats).

    init: "random" picks k distinct points (the original DeepCluster); "k-means++" samples
    them D^2-weighted (O(nkd) extra); "afk-mc2" approximates k-means++ by MCMC
    (O(nd + 50 k^2 d), about one Lloyd iteration at N = 128 k). Random starts often merge
    two true clusters and split another, which 20 Lloyd iterations do not undo
    (tests/test_deepcluster.py: 8 separated blobs were recovered by 0 of 20 random starts,
    18 of 20 k-means++ and 18 of 20 AFK-MC^2 starts), hence the default.

    Uses every point (no faiss subsampling: max_points_per_centroid is raised above n).
    faiss splits a large cluster to re-seed any cluster that empties during the
    iterations; the final assignment (nearest final centroid) can still leave one empty,
    which the sampler then skips. stats: objective, number of non-empty clusters,
    largest-cluster fraction, seconds.
    """
    import faiss

    t0 = time.perf_counter()
    x = np.ascontiguousarray(x.numpy() if torch.is_tensor(x) else x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise UserError(f"k-means: cannot make {k} clusters of {n} points (choose --clusters between 1 and {n})")
    if init not in KMEANS_INITS:
        raise UserError(f"k-means init must be one of {', '.join(KMEANS_INITS)}, not {init!r}")
    clus = faiss.Clustering(d, k)
    clus.init_method = {"random": faiss.ClusteringInitMethod_RANDOM,
                        "k-means++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
                        "afk-mc2": faiss.ClusteringInitMethod_AFK_MC2}[init]
    clus.niter = niter
    clus.seed = int(seed)
    clus.max_points_per_centroid = max(n // k + 1, 256)  # never subsample
    clus.min_points_per_centroid = 1  # small k-per-point ratios are expected here; no warning
    clus.verbose = False
    index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, d)
    final = faiss.IndexFlatL2(d)
    final.add(centroids)
    _, assign = final.search(x, 1)
    labels = assign[:, 0].astype(np.int64)
    sizes = np.bincount(labels, minlength=k)
    stats = clus.iteration_stats
    # faiss's stub says list; it is a SWIG vector (ClusteringIterationStatsVector): .size() and .at(i)
    size = stats.size()  # type: ignore[attr-defined]
    objective = float(stats.at(size - 1).obj) if size else float("nan")  # type: ignore[attr-defined]
    return labels, {
        "kmeans_obj": objective / n,
        "clusters_nonempty": int((sizes > 0).sum()),
        "largest_cluster_frac": float(sizes.max() / n),
        "cluster_time_s": time.perf_counter() - t0,
    }
