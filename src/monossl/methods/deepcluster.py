"""DeepCluster (Caron et al., 2018): k-means pseudo-labels of the trunk's own features.

Every epoch (`begin_epoch`, called by the training loop at each epoch boundary):

  1. features of the whole fixed training set (the source's samples 0..N-1: the same
     patches every epoch) from the trunk's penultimate layer, in eval mode, without
     augmentation, in chunks under `torch.no_grad`;
  2. PCA to `pca_dim` (256) dimensions with whitening (`pca.PCAWhitening`), fitted on a
     random subsample of at most `pca_sample` features (kept in fp16), then L2 normalisation;
  3. faiss k-means (`kmeans.run_kmeans`: 20 iterations, AFK-MC^2 seeding, a seed from the run
     seed and the epoch); a cluster left empty is never sampled;
  4. the epoch's order: N indices uniform over the non-empty clusters
     (`cluster_sampler.uniform_cluster_order`);
  5. a new randomly initialised linear head with k outputs and its own SGD optimiser (the
     cluster ids are new); the trunk's optimiser persists across epochs.

Each step: random-resized crop + flip, cross-entropy on the pseudo-labels of the batch's
indices; both optimisers step. SGD lr 0.1 (PAPER.md: 0.05), momentum 0.9, weight decay 1e-5;
constant lr unless `lr_milestones` is set.

Under torchrun every rank extracts features of one block of the N samples, they are gathered
on every rank, rank 0 runs PCA and k-means and broadcasts the labels. Memory (docs/deepcluster.md):
for N <= pca_sample the N x D features are held in fp16 and projected after the fit; otherwise
a first pass extracts the PCA subsample and a second extracts all N chunk by chunk, projecting
each at once, so only N x pca_dim fp32 is kept (1.28M x 256 -> 1.3 GB).

Everything random comes from generators seeded by (run seed, epoch), so a run resumed from a
checkpoint equals an uninterrupted one: the pseudo-labels, k and the head (rebuilt to k
outputs before its weights load) travel via `extra_state`, the head optimiser via `optimizers()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.device import autocast
from monossl.distributed import broadcast, gather_rows, is_main, shard_range
from monossl.errors import UserError
from monossl.methods.augment import random_resized_crop
from monossl.methods.base import Method, RunDefaults, accuracy, step_lr
from monossl.methods.cluster_sampler import uniform_cluster_order
from monossl.methods.kmeans import run_kmeans
from monossl.methods.nmi import nmi
from monossl.methods.pca import PCAWhitening
from monossl.models.trunks import Trunk
from monossl.seeds import derive_seed

if TYPE_CHECKING:  # the data package is imported where a run builds its source
    from monossl.data.batches import Source

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


def _seed(seed: int, epoch: int, salt: int) -> int:
    """A 31-bit seed (faiss takes no more) for (run seed, epoch, purpose)."""
    return derive_seed(seed, 0, epoch, salt) % (2**31 - 1)


def _eval_view(images: torch.Tensor, size: int) -> torch.Tensor:
    """The un-augmented view the features are computed on: centre crop if larger, resize if smaller."""
    h, w = images.shape[-2:]
    if h == size and w == size:
        return images
    if h >= size and w >= size:
        top, left = (h - size) // 2, (w - size) // 2
        return images[..., top:top + size, left:left + size]
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DeepCluster(Method):
    name = "deepcluster"
    Config = DeepClusterConfig
    # 16 epochs over 32,768 patches (docs/deepcluster.md); the Sobel front-end, as Caron et al.: on one
    # image it is what lets DeepCluster beat random features; lr 0.05 on AlexNet, the paper's
    defaults = RunDefaults(steps=4096, batch_size=128, num_patches=32768, sobel=True, alexnet_lr=0.05)

    def __init__(self, trunk: Trunk, total_steps: int, config: DeepClusterConfig | None = None):
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
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts: dict[str, torch.optim.Optimizer] = {"trunk": self._opt}
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
        if self.head is not None:
            self._parallel.pop((id(self.head),), None)  # the old head's data-parallel wrapper goes with it
        self.head = head.to(self._device())
        self._head_opt = torch.optim.SGD(self.head.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                                         weight_decay=self.config.weight_decay)

    # -- the epoch: features -> PCA -> k-means -> sampler, new head ----------------------
    @torch.no_grad()
    def _features(self, source: Source, indices: torch.Tensor, pca: PCAWhitening | None = None) -> torch.Tensor:
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

    def cluster(self, source: Source, epoch: int) -> tuple[torch.Tensor, dict]:
        """Pseudo-labels (N,) of the source's first N samples for this epoch, and the epoch's statistics."""
        cfg, n = self.config, source.length
        assert n is not None  # begin_epoch refuses an unlimited source
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
            assigned, stats = run_kmeans(x, k, seed=_seed(seed, epoch, 2), niter=cfg.kmeans_iters,
                                         init=cfg.kmeans_init)
        else:
            assigned, stats = np.zeros(n, dtype=np.int64), {}
        labels = broadcast(torch.from_numpy(assigned))
        if not stats:
            sizes = torch.bincount(labels, minlength=k)
            stats = {"clusters_nonempty": int((sizes > 0).sum()), "largest_cluster_frac": float(sizes.max() / n)}
        stats.update({"k": k, "feature_time_s": feature_time, "pca_dim": pca.dim})
        return labels, stats

    def begin_epoch(self, epoch: int, source: Source) -> dict:
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
        if collapsed and is_main():  # the module's logger by name: `log` here is the clustering's record
            logging.getLogger(__name__).warning(
                f"deepcluster epoch {epoch}: the clustering collapsed: the largest cluster holds "
                f"{100 * log['largest_cluster_frac']:.1f}% of the {source.length} samples and "
                f"{log['clusters_nonempty']} of {log['k']} clusters are non-empty. Try fewer --clusters, more "
                f"--num-patches or a lower --lr.")
        return {"order": order, "log": {k: float(v) for k, v in log.items()}}

    # -- a step ---------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert self.head is not None, "DeepCluster has no head before its first epoch"
        return self.head(self.trunk(images))

    def lr_at(self, step: int) -> float:
        return step_lr(self.config.lr, step, self.total_steps, milestones=self.config.lr_milestones)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.labels is None or self.head is None:
            raise UserError("DeepCluster needs a finite training set (--num-patches or --data): "
                            "its pseudo-labels are made at each epoch start")
        images = random_resized_crop(batch["images"], self.trunk.input_size, scale=self.config.crop_scale,
                                     flip_prob=self.config.flip_prob)
        labels = self.labels[batch["index"].cpu()].to(images.device)
        # the trunk and the head (new every epoch) each under data parallelism
        logits = self.parallel(self.head)(self.parallel(self.trunk)(images))
        return F.cross_entropy(logits.float(), labels), {"cluster_acc": accuracy(logits, labels)}
