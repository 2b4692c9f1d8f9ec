"""The linear probes themselves and how they are scored.

`LinearProbes` holds one `BatchNorm1d(d, affine=False)` + `Linear(d, classes)` per tap (the
heads share no parameters, so training them together on the summed cross-entropy trains each
as if alone). `score` counts top-1/top-5 over batches of features, averaging the logits of an
image's test crops first (`average_crop_logits`) and summing the counts over ranks under torchrun.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from monossl.distributed import all_sum


class LinearProbes(nn.Module):
    """One BatchNorm1d(affine=False) + Linear per tap.

    With `fixed_stats` (after `set_stats`) the BatchNorm layers stay in eval mode even when the
    module is put in training mode: they apply the given statistics and learn nothing.
    """

    def __init__(self, dims: dict[str, int], num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.heads = nn.ModuleDict({
            name: nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, num_classes))
            for name, d in dims.items()
        })
        for head in self.heads.values():  # DeepCluster's init: N(0, 0.01), zero bias
            nn.init.normal_(head[1].weight, 0.0, 0.01, generator=generator)
            nn.init.zeros_(head[1].bias)
        self.fixed_stats = False

    def set_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fix every BatchNorm to the given (mean, biased variance) per tap."""
        for name, (mean, var) in stats.items():
            bn = self.heads[name][0]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        self.fixed_stats = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fixed_stats:
            for head in self.heads.values():
                head[0].eval()
        return self

    def forward(self, feats: dict[str, torch.Tensor], standardized: bool = False) -> dict[str, torch.Tensor]:
        """Logits per tap; `standardized=True` skips the BatchNorm (features already standardised
        with the fixed statistics, as the cached path stores them)."""
        if standardized:
            return {name: head[1](feats[name]) for name, head in self.heads.items()}
        return {name: head(feats[name]) for name, head in self.heads.items()}


def average_crop_logits(logits: torch.Tensor, n_crops: int) -> torch.Tensor:
    """(B * n_crops, K) logits of consecutive crops of each image -> (B, K) mean logits."""
    if n_crops == 1:
        return logits
    return logits.view(-1, n_crops, logits.shape[-1]).mean(1)


def topk_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(top-1, top-5) counts of correct predictions in a batch (top-k with k = classes when fewer than 5)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == y[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


def score(probes, batches, n, n_crops, device, standardized, sharded=False) -> dict[str, tuple[float, float]]:
    """Top-1 / top-5 (%) per tap over `batches` of (features, labels); `sharded`: the ranks hold
    disjoint parts of the n images and the counts are summed over ranks."""
    correct = {k: [0, 0] for k in probes.heads}
    with torch.no_grad():
        for feats, y in batches:
            y = y.to(device)
            for k, lg in probes(feats, standardized=standardized).items():
                c1, c5 = topk_correct(average_crop_logits(lg.float(), n_crops), y)
                correct[k][0] += c1
                correct[k][1] += c5
    if sharded:  # each rank scored its block of the test set
        counts = all_sum(torch.tensor([correct[k] for k in correct], dtype=torch.float64))
        correct = {k: c.tolist() for k, c in zip(correct, counts)}
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}
