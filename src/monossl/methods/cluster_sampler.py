"""DeepCluster's epoch order: sample indices drawn uniformly over the non-empty clusters."""

from __future__ import annotations

import torch


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
