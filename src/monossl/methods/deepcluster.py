"""DeepCluster (Caron et al., 2018): k-means pseudo-labels of the trunk's own features.

Every epoch (`begin_epoch`, called by the training loop at each epoch boundary):

  1. features of the whole fixed training set (indices 0..N-1 of the source: the patch
     stream's first N patches, which are the same patches every epoch, or a dataset's
     images) from the trunk's penultimate layer, in eval mode, without augmentation, in
     chunks under `torch.no_grad`;
  2. PCA to `pca_dim` (256) dimensions with whitening, fitted on a random subsample of at
     most `pca_sample` features (kept in fp16), then L2 normalisation;
  3. k-means with faiss (`kmeans_iters` = 20 iterations, a fresh seed derived from the run
     seed and the epoch, AFK-MC^2 seeding by default, see `run_kmeans`); faiss re-seeds clusters that empty during its iterations, and
     any cluster still empty in the final assignment is simply never sampled;
  4. the epoch's order: N indices drawn uniformly over the non-empty clusters (each
     cluster gets N // m or N // m + 1 draws, without replacement while it has enough
     members, cycling through them when it has fewer);
  5. a new randomly initialised linear head with k outputs and its own SGD optimiser (the
     cluster ids are new); the trunk's optimiser persists across epochs.

Each step: the method's random-resized crop + flip, cross-entropy on the pseudo-labels
of the batch's indices; both optimisers step. SGD lr 0.1 (PAPER.md: 0.05), momentum 0.9,
weight decay 1e-5; constant lr unless `lr_milestones` is set.

Under torchrun every rank extracts features of one block of the N samples, they are
gathered on every rank, rank 0 runs PCA and k-means and broadcasts the labels.

Memory (see docs/deepcluster.md): when N <= pca_sample the N x D features are held in
fp16 and projected after the fit; otherwise a first pass extracts the PCA subsample
(pca_sample x D fp16) and a second pass extracts all N in chunks and projects each chunk
at once, so only N x pca_dim fp32 is kept (1.28M x 256 -> 1.3 GB).

Everything random is drawn from generators seeded by (run seed, epoch), so runs are
reproducible and a run resumed from a checkpoint equals an uninterrupted one: the
pseudo-labels, k and the head (rebuilt to k outputs before its weights load) travel in
the checkpoint via `extra_state`, the head optimiser via `optimizers()`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.device import autocast
from monossl.distributed import broadcast, gather_rows, is_main, shard_range
from monossl.errors import UserError
from monossl.methods.augment import random_resized_crop
from monossl.methods.base import Method, accuracy, set_lr, step_lr

#: default k: about this many points per cluster (ImageNet: 1.28M / 10,000 = 128) ...
POINTS_PER_CLUSTER = 128
#: ... bounded to [MIN_CLUSTERS, MAX_CLUSTERS] (and to at most N // 2)
MIN_CLUSTERS = 10
MAX_CLUSTERS = 10_000


def default_clusters(n: int) -> int:
    """k for a training set of n samples: n / 128, bounded to [10, 10000] and to at most n // 2."""
    k = min(max(n // POINTS_PER_CLUSTER, MIN_CLUSTERS), MAX_CLUSTERS)
    return max(1, min(k, n // 2))


@dataclass
class DeepClusterConfig:
    lr: float = 0.1  # 0.05 in PAPER.md; 0.1 does better in our short budgets (docs/deepcluster.md)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    lr_milestones: tuple[float, ...] = ()  # fractions of training where lr drops 10x; () = constant lr
    clusters: int | None = None  # k; None: default_clusters(N) = N / 128 bounded to [10, 10000]
    pca_dim: int = 256
    pca_sample: int = 50_000  # PCA is fitted on at most this many features (a random subsample)
    eig_floor: float = 1e-5  # eigenvalues below eig_floor * (largest) are floored before whitening
    kmeans_iters: int = 20
    kmeans_init: str = "afk-mc2"  # "random" (the original DeepCluster), "k-means++" or "afk-mc2" (see run_kmeans)
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip_prob: float = 0.5
    feature_batch: int = 512  # images per chunk of feature extraction
    collapse_fraction: float = 0.5  # warn when the largest cluster holds more than this fraction


# ---------------------------------------------------------------------------------------
# The pieces (pure functions, tested on their own)
# ---------------------------------------------------------------------------------------

def _seed(seed: int, epoch: int, salt: int) -> int:
    """A 31-bit seed for (run seed, epoch, purpose)."""
    return (seed * 1_000_003 + epoch * 7919 + salt * 104_729) % (2**31 - 1)


class PCAWhitening:
    """PCA to `dim` dimensions with whitening: y = ((x - mean) @ V) / sqrt(max(lambda, floor)).

    Fitted in float64 (eigh of the covariance); `floor` = eig_floor * largest eigenvalue
    keeps near-null directions (dead units, fewer samples than dimensions) from being
    blown up into noise. On the data it was fitted on, the output covariance is the
    identity in every direction whose eigenvalue is above the floor.
    """

    def __init__(self, mean: torch.Tensor, projection: torch.Tensor, eigenvalues: torch.Tensor):
        self.mean = mean  # (D,) float32
        self.projection = projection  # (D, dim) float32, whitening folded in
        self.eigenvalues = eigenvalues  # (dim,) float64, before flooring

    @classmethod
    def fit(cls, x: torch.Tensor, dim: int, eig_floor: float = 1e-5, chunk: int = 8192) -> "PCAWhitening":
        n, d = x.shape
        if n < 2:
            raise ValueError("PCA needs at least 2 samples")
        mean = torch.zeros(d, dtype=torch.float64)
        for i in range(0, n, chunk):
            mean += x[i:i + chunk].double().sum(0)
        mean /= n
        dim = min(dim, d)
        if n < d:
            evals, evecs = cls._eig_from_gram(x, mean, dim)
        else:
            cov = torch.zeros(d, d, dtype=torch.float64)
            for i in range(0, n, chunk):
                xc = x[i:i + chunk].double() - mean
                cov += xc.t() @ xc
            cov /= n - 1
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
        floor = max(float(evals[0]) * eig_floor, 1e-12)
        scale = evals.clamp(min=floor).rsqrt()
        return cls(mean.float(), (evecs * scale).float(), evals)

    @staticmethod
    def _eig_from_gram(x: torch.Tensor, mean: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top `dim` eigenpairs of the covariance from the n x n Gram matrix, for n < D
        (AlexNet's D = 4096 with a few thousand samples: an n x n eigh instead of 4096 x 4096,
        25-30 s on 2 cores). Directions beyond the data's rank get zero vectors: the data has
        no variance there, so they carry nothing (the covariance route gives arbitrary ones)."""
        n, d = x.shape
        xc = x.double() - mean
        evals, u = torch.linalg.eigh(xc @ xc.t() / (n - 1))  # ascending
        evals, u = evals.flip(0)[:dim].clamp(min=0), u.flip(1)[:, :dim]
        rank_ok = evals > evals[0] * 1e-12
        evecs = (xc.t() @ u) / (evals * (n - 1)).sqrt().clamp(min=1e-300)  # unit-norm eigenvectors of xc^T xc
        evecs[:, ~rank_ok] = 0
        if dim > len(evals):  # fewer samples than dimensions asked for
            evals = torch.cat([evals, evals.new_zeros(dim - len(evals))])
            evecs = torch.cat([evecs, evecs.new_zeros(d, dim - evecs.shape[1])], dim=1)
        return evals, evecs

    @property
    def dim(self) -> int:
        return self.projection.shape[1]

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) @ self.projection


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
    objective = float(stats.at(stats.size() - 1).obj) if stats.size() else float("nan")
    return labels, {
        "kmeans_obj": objective / n,
        "clusters_nonempty": int((sizes > 0).sum()),
        "largest_cluster_frac": float(sizes.max() / n),
        "cluster_time_s": time.perf_counter() - t0,
    }


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a, b) -> float:
    """Normalised mutual information of two labelings, I(a;b) / mean(H(a), H(b)).

    The arithmetic-mean normalisation of scikit-learn's default; 1.0 for identical
    partitions (up to renaming), 0.0 for independent ones. Two single-cluster labelings
    count as identical (1.0).
    """
    from scipy.sparse import coo_matrix

    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError("nmi: the labelings have different lengths")
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    n = a.size
    joint = coo_matrix((np.ones(n), (ai, bi)), shape=(ai.max() + 1, bi.max() + 1)).tocsr()
    joint.sum_duplicates()
    ha, hb = _entropy(np.bincount(ai)), _entropy(np.bincount(bi))
    if ha == 0.0 and hb == 0.0:
        return 1.0
    if ha == 0.0 or hb == 0.0:
        return 0.0
    pa, pb = np.bincount(ai) / n, np.bincount(bi) / n
    rows, cols = joint.nonzero()
    pij = np.asarray(joint[rows, cols]).ravel() / n
    mi = float((pij * (np.log(pij) - np.log(pa[rows]) - np.log(pb[cols]))).sum())
    return max(0.0, min(1.0, mi / ((ha + hb) / 2)))


def uniform_cluster_order(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n sample indices drawn uniformly over the non-empty clusters of `labels`, shuffled.

    Each of the m non-empty clusters gets n // m draws, plus one for n % m of them chosen at
    random. Within a cluster the draws walk a random permutation of its members, so they
    are without replacement while the cluster has enough members and spread evenly over
    them (each used ceil or floor of draws/size times) when it has fewer. Empty clusters
    are skipped, so the sampler never fails on them.
    """
    labels = labels.long().cpu()
    if labels.numel() == 0:
        raise ValueError("no labels to sample from")
    # members grouped by cluster, in random order within each cluster
    perm = torch.randperm(labels.numel(), generator=generator)
    grouped = perm[torch.sort(labels[perm], stable=True).indices]
    ids, sizes = torch.unique_consecutive(labels[grouped], return_counts=True)
    offsets = torch.cumsum(sizes, 0) - sizes
    m = ids.numel()
    draws = torch.full((m,), n // m, dtype=torch.long)
    draws[torch.randperm(m, generator=generator)[: n % m]] += 1
    which = torch.repeat_interleave(torch.arange(m), draws)  # cluster (0..m-1) of each draw
    within = torch.arange(n) - torch.repeat_interleave(torch.cumsum(draws, 0) - draws, draws)
    picks = grouped[offsets[which] + within % sizes[which]]
    return picks[torch.randperm(n, generator=generator)]


def _eval_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The un-augmented view the features are computed on: centre crop if larger, resize if smaller."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return images[..., top:top + size, left:left + size]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------

class DeepCluster(Method):
    name = "deepcluster"
    Config = DeepClusterConfig

    def __init__(self, trunk, total_steps: int, config: DeepClusterConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config or DeepClusterConfig()
        self.head: nn.Linear | None = None  # built per epoch, once k is known
        self._head_opt: torch.optim.Optimizer | None = None
        self.labels: torch.Tensor | None = None  # (N,) int64 pseudo-labels of the current epoch, on CPU
        self.k: int | None = None
        self.epoch: int | None = None
        self._opt = torch.optim.SGD(self.trunk.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                                    weight_decay=self.config.weight_decay)

    # -- state --------------------------------------------------------------------------
    def optimizers(self):
        opts = {"trunk": self._opt}
        if self._head_opt is not None:
            opts["head"] = self._head_opt
        return opts

    def extra_state(self) -> dict:
        return {"k": self.k, "epoch": self.epoch,
                "labels": None if self.labels is None else self.labels.clone()}

    def load_extra_state(self, state: dict) -> None:
        self.k, self.epoch = state["k"], state["epoch"]
        self.labels = None if state["labels"] is None else state["labels"].long().cpu()
        if self.k is not None:
            self._new_head(self.k, torch.Generator().manual_seed(0))  # its weights and optimiser state load next

    def _device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def _new_head(self, k: int, generator: torch.Generator | None) -> None:
        head = nn.Linear(self.trunk.feature_dim, k)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        self.head = head.to(self._device())
        self._head_opt = torch.optim.SGD(self.head.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                                         weight_decay=self.config.weight_decay)

    # -- the epoch: features -> PCA -> k-means -> sampler, new head ----------------------
    @torch.no_grad()
    def _features(self, source, indices: torch.Tensor, pca: PCAWhitening | None = None) -> torch.Tensor:
        """Trunk features of `indices` in eval mode without augmentation, chunk by chunk.

        Without `pca`: (len, D) fp16. With `pca`: each chunk is projected at once, (len, dim) fp32.
        Under torchrun each rank extracts one block of `indices` and every rank gets them all.
        """
        device = self._device()
        start, stop = shard_range(len(indices))
        mine = indices[start:stop]
        out = torch.empty(len(mine), pca.dim if pca is not None else self.trunk.feature_dim,
                          dtype=torch.float32 if pca is not None else torch.float16)
        for i in range(0, len(mine), self.config.feature_batch):
            idx = mine[i:i + self.config.feature_batch]
            images = source.fetch(idx)["images"].to(device, non_blocking=True)
            images = _eval_view(images, self.trunk.input_size).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                f = self.trunk(images)
            f = f.float().cpu()
            if not torch.isfinite(f).all():
                raise UserError("DeepCluster: the trunk's features are not finite (training diverged?)")
            out[i:i + len(idx)] = pca.transform(f) if pca is not None else f.half()
        return gather_rows(out, len(indices))

    def cluster(self, source, epoch: int) -> tuple[torch.Tensor, dict]:
        """Pseudo-labels (N,) of the source's first N samples for this epoch, and the epoch's statistics."""
        cfg, n = self.config, source.length
        seed = getattr(source, "seed", 0)
        k = cfg.clusters or default_clusters(n)
        if not 1 <= k <= n:
            raise UserError(f"DeepCluster: --clusters {k} does not fit a training set of {n} samples")
        was_training = self.trunk.training
        self.trunk.eval()
        t0 = time.perf_counter()
        try:
            everything = torch.arange(n)
            if n <= cfg.pca_sample:  # one pass: all N features in fp16, PCA fitted on them all
                feats = self._features(source, everything)
                pca = PCAWhitening.fit(feats, cfg.pca_dim, cfg.eig_floor)
                x = torch.cat([pca.transform(feats[i:i + 65536]) for i in range(0, n, 65536)])
                del feats
            else:  # two passes: fit on a random subsample, then extract + project chunk by chunk
                g = torch.Generator().manual_seed(_seed(seed, epoch, 1))
                sample = torch.randperm(n, generator=g)[:cfg.pca_sample].sort().values
                pca = PCAWhitening.fit(self._features(source, sample), cfg.pca_dim, cfg.eig_floor)
                x = self._features(source, everything, pca)
        finally:
            self.trunk.train(was_training)
        x.div_(x.norm(dim=1, keepdim=True).clamp_(min=1e-12))  # L2-normalise in place: no second N x 256 copy
        feature_time = time.perf_counter() - t0
        if is_main():  # under torchrun rank 0 clusters and the others receive its labels
            labels, stats = run_kmeans(x, k, seed=_seed(seed, epoch, 2), niter=cfg.kmeans_iters,
                                       init=cfg.kmeans_init)
        else:
            labels, stats = np.zeros(n, dtype=np.int64), {}
        labels = broadcast(torch.from_numpy(labels))
        if not stats:
            sizes = torch.bincount(labels, minlength=k)
            stats = {"clusters_nonempty": int((sizes > 0).sum()), "largest_cluster_frac": float(sizes.max() / n)}
        stats.update({"k": k, "feature_time_s": feature_time, "pca_dim": pca.dim})
        return labels, stats

    def begin_epoch(self, epoch: int, source) -> dict:
        if source.length is None:
            raise UserError("DeepCluster needs a finite training set: give --num-patches or --data")
        labels, log = self.cluster(source, epoch)  # the same labels on every rank
        if self.labels is not None and self.labels.shape == labels.shape:
            log["nmi_prev"] = nmi(self.labels.numpy(), labels.numpy())
        self.labels, self.k, self.epoch = labels, log["k"], epoch
        seed = getattr(source, "seed", 0)
        order = uniform_cluster_order(labels, source.length, torch.Generator().manual_seed(_seed(seed, epoch, 3)))
        self._new_head(self.k, torch.Generator().manual_seed(_seed(seed, epoch, 4)))
        collapsed = log["largest_cluster_frac"] > self.config.collapse_fraction or log["clusters_nonempty"] < 2
        log["collapse"] = float(collapsed)
        if collapsed and is_main():
            print(f"WARNING: deepcluster epoch {epoch}: the clustering collapsed: the largest cluster holds "
                  f"{100 * log['largest_cluster_frac']:.1f}% of the {source.length} samples and "
                  f"{log['clusters_nonempty']} of {log['k']} clusters are non-empty. Try fewer --clusters, more "
                  f"--num-patches or a lower --lr.", file=sys.stderr, flush=True)
        return {"order": order, "log": {k: float(v) for k, v in log.items()}}

    # -- a step ---------------------------------------------------------------------------
    def forward(self, images):
        return self.head(self.trunk(images))

    def step(self, batch, step):
        if self.labels is None or self.head is None:
            raise UserError("DeepCluster needs a finite training set (--num-patches or --data): "
                            "its pseudo-labels are made at each epoch start")
        images = random_resized_crop(batch["images"], self.trunk.input_size, scale=self.config.crop_scale,
                                     flip_prob=self.config.flip_prob)
        labels = self.labels[batch["index"].cpu()].to(images.device)
        lr = step_lr(self.config.lr, step, self.total_steps, milestones=self.config.lr_milestones)
        set_lr(self._opt, lr)
        set_lr(self._head_opt, lr)
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        self._opt.zero_grad(set_to_none=True)
        self._head_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step(self._opt)
        self.optimizer_step(self._head_opt)
        return {"loss": loss.item(), "cluster_acc": accuracy(logits, labels), "lr": lr}

