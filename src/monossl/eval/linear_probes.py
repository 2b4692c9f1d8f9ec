"""The linear probes themselves and how they are scored.

`LinearProbes` holds one `BatchNorm1d(d, affine=False)` + `Linear(d, classes)` per tap (the
heads share no parameters, so training them together on the summed cross-entropy trains each
as if alone). `score` counts top-1/top-5 over batches of features, averaging the logits of an
image's test crops first (`average_crop_logits`) and summing the counts over ranks under torchrun.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

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


class Fp32Heads:
    """The fp32 path's trainer: every tap's Linear(d, classes) of a `LinearProbes`, trained on
    standardised cached features (fp16 in the cache) in fp32, exactly as the autograd loop trains
    them (each head on its own cross-entropy, torch.optim.SGD's momentum and weight decay, the same
    minibatches) but with fewer, larger memory passes.

    Measured on 2 cores (docs/probes.md, "The fp32 path"), a step here costs about half of the
    autograd loop's:
      * the gradient is written by hand: cross-entropy's is (softmax - onehot) / B and the linear
        layer's is g @ x, so one step is ~10 small ops per tap and 3 for the whole SGD update (all
        parameters in one flat buffer) instead of autograd's graph and a per-parameter optimiser;
      * one tap at a time: gather its rows, convert them to fp32, forward, gradient, backward while
        the (B, d) block is still in cache; one reused gather buffer instead of one per tap;
      * logits are computed as W @ x.T, (classes, B): MKL runs that skinny product ~2x faster than
        x @ W.T.
    """

    def __init__(self, probes: LinearProbes, device, momentum: float, weight_decay: float, max_batch: int):
        self.names = list(probes.heads)
        linears = [probes.heads[k][1] for k in self.names]
        self.dims = [lin.in_features for lin in linears]
        self.classes = classes = linears[0].out_features
        self.momentum, self.weight_decay = momentum, weight_decay
        n_weights = classes * sum(self.dims)
        # weights of every head, then every bias: one tensor for the SGD update
        self.params = torch.empty(n_weights + classes * len(self.dims), device=device)
        self.grads = torch.empty_like(self.params)
        self.velocity = None  # SGD's momentum buffer, created at the first step as torch.optim.SGD does
        self.weights, self.weight_grads, start = [], [], 0
        for d in self.dims:
            self.weights.append(self.params[start:start + classes * d].view(classes, d))
            self.weight_grads.append(self.grads[start:start + classes * d].view(classes, d))
            start += classes * d
        self.biases = self.params[n_weights:].view(len(self.dims), classes, 1)  # broadcast over the batch
        self.bias_grads = self.grads[n_weights:].view(len(self.dims), classes)
        with torch.no_grad():
            for w, b, lin in zip(self.weights, self.biases, linears):
                w.copy_(lin.weight)
                b.copy_(lin.bias[:, None])
        self.max_batch, self.device = max_batch, device
        self._x = torch.empty(max_batch * max(self.dims), device=device)  # one tap's rows in fp32
        self._logits = torch.empty(classes, max_batch, device=device)
        self._losses = torch.empty(len(self.dims), device=device)
        self._minus_one = torch.full((1, max_batch), -1.0, device=device)

    def store(self, probes: LinearProbes) -> None:
        """Copy the trained weights back into the probes' Linear layers."""
        with torch.no_grad():
            for name, w, b in zip(self.names, self.weights, self.biases):
                probes.heads[name][1].weight.copy_(w)
                probes.heads[name][1].bias.copy_(b[:, 0])

    def epoch(self, caches: dict[str, torch.Tensor], labels: torch.Tensor, batches, lr: float,
              on_step=lambda: None) -> tuple[dict[str, float], int]:
        """One epoch of SGD steps on the standardised fp16 caches over the given minibatches (index
        tensors); returns ({tap: summed cross-entropy over the epoch's images}, images seen)."""
        caches = [caches[k] for k in self.names]
        store = caches[0].device
        half = torch.empty(self.max_batch * max(self.dims), dtype=torch.float16, device=store)
        loss_sums = torch.zeros(len(self.dims), dtype=torch.float64, device=self.device)
        seen = 0
        for idx in batches:
            y = labels[idx].to(self.device)
            loss_sums.add_(self.step(caches, idx.to(store), y, lr, half), alpha=len(idx))
            seen += len(idx)
            on_step()
        return dict(zip(self.names, loss_sums.tolist())), seen

    def step(self, caches: list[torch.Tensor], idx: torch.Tensor, y: torch.Tensor, lr: float,
             half: torch.Tensor) -> torch.Tensor:
        """One SGD step on the rows `idx` of every tap's cache, labels `y` (on the device), gathered
        through the fp16 buffer `half`; returns each tap's mean cross-entropy (a tensor: no sync)."""
        b = len(idx)
        for i, cache in enumerate(caches):
            d = cache.shape[1]
            rows = half[:b * d].view(b, d)
            # 16-bit rows gathered as int16: the same bytes, and a faster index_select kernel on CPU
            torch.index_select(cache.view(torch.int16), 0, idx, out=rows.view(torch.int16))
            x = self._x[:b * d].view(b, d)
            x.copy_(rows)
            logits = torch.addmm(self.biases[i], self.weights[i], x.t(), out=self._logits[:, :b])
            logp = torch.log_softmax(logits, dim=0)
            self._losses[i] = F.nll_loss(logp.t(), y)
            g = logp.exp_()  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / B
            g.scatter_add_(0, y[None], self._minus_one[:, :b])
            g.mul_(1.0 / b)
            torch.mm(g, x, out=self.weight_grads[i])
            torch.sum(g, 1, out=self.bias_grads[i])
        # torch.optim.SGD's single-tensor update (no dampening, no Nesterov), on the flat buffer
        self.grads.add_(self.params, alpha=self.weight_decay)
        if self.velocity is None:
            self.velocity = self.grads.clone()
        else:
            self.velocity.mul_(self.momentum).add_(self.grads)
        self.params.add_(self.velocity, alpha=-lr)
        return self._losses

    @torch.no_grad()
    def score(self, caches: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, tuple[float, float]]:
        """Top-1 / top-5 (%) per tap on standardised cached features (counted as `score` counts)."""
        n = len(labels)
        correct = {k: [0, 0] for k in self.names}
        for start in range(0, n, self.max_batch):
            y = labels[start:start + self.max_batch].to(self.device)
            b = len(y)
            for i, name in enumerate(self.names):
                x = self._x[:b * self.dims[i]].view(b, self.dims[i])
                x.copy_(caches[name][start:start + b])
                logits = torch.addmm(self.biases[i], self.weights[i], x.t(), out=self._logits[:, :b])
                c1, c5 = topk_correct(logits.t(), y)
                correct[name][0] += c1
                correct[name][1] += c5
        return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}
