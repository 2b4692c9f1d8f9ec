"""Weighted k-nearest-neighbour classification of features, as DINO (Caron et al., 2021) reports it.

Features are L2-normalised; each test point's k most cosine-similar training points vote for
their labels with weight exp(similarity / T) (T = 0.07); the class with the largest summed weight
is the prediction. `probe(..., knn=(20, 200))` runs it on the pooled features of every tap the
linear probes already cached (before their standardisation), so it costs one similarity matmul
per tap. The matmul runs in bf16 where oneDNN or CUDA do it (`features.probe_matmul_dtype`) and
the neighbours are ranked on its bf16 output (converting 50,000 similarities per query to fp32
first costs more than the ranking); the vote is in fp32.

`knn_values`: that matmul is most of the cost (10,000 x 50,000 x 4,608 per tap on CIFAR-10), so
`coarser` can average-pool the cached grid further, to the smallest side giving at least that many
values (1024: conv1 32x6x6, conv4 256x2x2). docs/probes.md has what it costs in accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from monossl.eval.protocols import Pool


def _normalised(features: torch.Tensor, dtype: torch.dtype, chunk: int = 4096) -> torch.Tensor:
    """Rows scaled to unit length (computed in fp32 chunk by chunk), stored in `dtype`."""
    out = torch.empty(features.shape, dtype=dtype, device=features.device)
    for i in range(0, len(features), chunk):
        out[i:i + chunk] = F.normalize(features[i:i + chunk].float(), dim=1).to(dtype)
    return out


@torch.no_grad()
def coarser(features: torch.Tensor, pooled_shape: Sequence[int], values: int, chunk: int = 4096) -> torch.Tensor:
    """Cached (N, C*h*w) features of a (C, h, w) grid average-pooled to the smallest grid with >= `values`."""
    pool = Pool("adaptive-avg", values=values)
    shape = tuple(pooled_shape)
    if len(shape) != 3 or pool.side(shape[0], shape[1]) >= shape[1]:
        return features
    parts = [pool(features[i:i + chunk].float().view(-1, *shape)).flatten(1).to(features.dtype)
             for i in range(0, len(features), chunk)]
    return torch.cat(parts)


@torch.no_grad()
def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 ks: Sequence[int] = (20, 200), temperature: float = 0.07, num_classes: int | None = None,
                 dtype: torch.dtype = torch.float32, chunk: int = 1024) -> dict[str, float]:
    """{"k20": top-1 %, "k200": ...} of weighted k-NN; train/test are (N, D) features of any float dtype."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    kmax = min(max(ks), len(train))
    bank = _normalised(train, dtype)
    labels = train_labels.to(train.device)
    correct: dict[int, float] = {k: 0 for k in ks}
    for i in range(0, len(test), chunk):
        queries = _normalised(test[i:i + chunk], dtype)
        top_sims, top_idx = (queries @ bank.T).topk(kmax, dim=1)  # sorted, most similar first
        weights = (top_sims.float() / temperature).exp()
        onehot = F.one_hot(labels[top_idx], num_classes).float()  # (b, kmax, C)
        truth = test_labels[i:i + chunk].to(train.device)
        for k in ks:
            votes = (onehot[:, :min(k, kmax)] * weights[:, :min(k, kmax), None]).sum(1)
            correct[k] += (votes.argmax(1) == truth).sum().item()
    return {f"k{k}": round(100 * correct[k] / len(test), 2) for k in ks}
