"""The linear probes themselves and how they are scored.

`LinearProbes` holds one `BatchNorm1d(d, affine=False)` + `Linear(d, classes)` per tap (the
heads share no parameters, so training them together on the summed cross-entropy trains each
as if alone). `score` counts top-1/top-5 over batches of features, averaging the logits of an
image's test crops first (`average_crop_logits`) and summing the counts over ranks under torchrun.
`Fp32Heads` trains the Linear layers on standardised fp16 caches with fp32 matmuls and a
hand-written gradient: the fp32 path, for CPUs without bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
        for name in self.heads:  # DeepCluster's init: N(0, 0.01), zero bias
            linear = self.head(name)[1]
            nn.init.normal_(linear.weight, 0.0, 0.01, generator=generator)
            nn.init.zeros_(linear.bias)
        self.fixed_stats = False

    def head(self, name: str) -> tuple[nn.BatchNorm1d, nn.Linear]:
        """Tap `name`'s head: its BatchNorm and its Linear layer."""
        bn, linear = self.heads[name].children()
        assert isinstance(bn, nn.BatchNorm1d) and isinstance(linear, nn.Linear)
        return bn, linear

    def set_stats(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fix every BatchNorm to the given (mean, biased variance) per tap."""
        for name, (mean, var) in stats.items():
            bn = self.head(name)[0]
            assert bn.running_mean is not None and bn.running_var is not None  # it tracks statistics
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        self.fixed_stats = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.fixed_stats:
            for name in self.heads:
                self.head(name)[0].eval()
        return self

    def forward(self, feats: dict[str, torch.Tensor], standardized: bool = False) -> dict[str, torch.Tensor]:
        """Logits per tap; `standardized=True` skips the BatchNorm (features already standardised
        with the fixed statistics, as the cached path stores them)."""
        if standardized:
            return {name: self.head(name)[1](feats[name]) for name in self.heads}
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


def score(probes: LinearProbes, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]], n: int, n_crops: int,
          device: torch.device, standardized: bool, sharded: bool = False) -> dict[str, tuple[float, float]]:
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
    """The fp32 path's trainer of a `LinearProbes`' Linear layers on standardised cached features
    (fp16 in the cache): the same model as the autograd loop up to float rounding (each head on its
    own cross-entropy, torch.optim.SGD's momentum and weight decay, the same minibatches), in less
    than half its time (measured: docs/probes.md, "The fp32 path"):

      * the gradient is written by hand, which pays here: cross-entropy's is (softmax - onehot) / B
        and the weights' is g @ x, so a step is ~12 ops per tap and 3 for the SGD update of all
        parameters (one flat buffer) instead of autograd's graph and a per-parameter optimiser;
      * a tap at a time: gather its rows, convert them to fp32, forward, gradient and backward while
        that block is still in cache, through one reused buffer;
      * logits as W @ x.T, (classes, B): MKL runs that skinny product ~2x faster than x @ W.T;
      * with 2+ threads the minibatch is split in two row blocks multiplied by one bmm: MKL runs a
        single skinny product on one core, bmm runs the two blocks side by side.
    """

    def __init__(self, probes: LinearProbes, device: torch.device, momentum: float, weight_decay: float,
                 max_batch: int):
        self.names = list(probes.heads)
        linears = [probes.head(k)[1] for k in self.names]
        self.dims = [lin.in_features for lin in linears]
        self.classes = classes = linears[0].out_features
        self.momentum, self.weight_decay = momentum, weight_decay
        n_weights = classes * sum(self.dims)
        self.params = torch.empty(n_weights + classes * len(self.dims), device=device)  # weights, then biases
        self.grads = torch.empty_like(self.params)
        # SGD's momentum buffer, created at the first step as torch.optim.SGD does
        self.velocity: torch.Tensor | None = None
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
        self._logits = torch.empty(classes * max_batch, device=device)
        self._partial = torch.empty(2 * classes * max(self.dims), device=device)  # the row blocks' gradients
        self._minus_one = torch.full((max_batch,), -1.0, device=device)
        self._log_p = torch.empty(len(self.dims), device=device)  # summed log-probability of the labels

    def store(self, probes: LinearProbes) -> None:
        """Copy the trained weights into the probes' Linear layers."""
        with torch.no_grad():
            for name, w, b in zip(self.names, self.weights, self.biases):
                linear = probes.head(name)[1]
                linear.weight.copy_(w)
                linear.bias.copy_(b[:, 0])

    def epoch(self, caches: dict[str, torch.Tensor], labels: torch.Tensor, batches: Iterable[torch.Tensor], lr: float,
              on_step: Callable[[], object] = lambda: None) -> tuple[dict[str, float], int]:
        """One epoch of SGD steps on the standardised fp16 caches over the given minibatches (index
        tensors); returns ({tap: summed cross-entropy over the epoch's images}, images seen)."""
        if any(caches[k].dtype != torch.float16 for k in self.names):
            raise ValueError("Fp32Heads trains on fp16 caches")
        rows = [caches[k].view(torch.int16) for k in self.names]  # gathered as int16: the same bytes, a faster kernel
        store = rows[0].device
        half = torch.empty(len(self._x), dtype=torch.float16, device=store)  # gathered rows, before conversion
        plans = {}
        loss_sums = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        seen = 0
        for idx in batches:
            b = len(idx)
            if b not in plans:
                plans[b] = self._plan(b, half)
            self.step(rows, idx.to(store), labels[idx].to(self.device), lr, plans[b])
            loss_sums.sub_(self._log_p)
            seen += b
            on_step()
        return dict(zip(self.names, loss_sums.tolist())), seen

    def _blocks(self, b: int) -> int:
        """Row blocks of a b-row batch: two where a second thread can multiply one of them."""
        return 2 if b % 2 == 0 and self.device.type == "cpu" and torch.get_num_threads() > 1 else 1

    def _logits_of(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Tap i's logits of the row blocks x (blocks, rows, d): (blocks, classes, rows)."""
        blocks, rows, d = x.shape
        out = self._logits[:blocks * self.classes * rows].view(blocks, self.classes, rows)
        w = self.weights[i].expand(blocks, self.classes, d)
        return torch.baddbmm(self.biases[i], w, x.transpose(1, 2), out=out)

    def _plan(self, b: int, half: torch.Tensor) -> tuple:
        """The views a step of b rows works through, made once per batch size (views cost Python time)."""
        blocks = self._blocks(b)
        k, rows = self.classes, b // blocks
        taps = []
        for i, d in enumerate(self.dims):
            gathered = half[:b * d].view(b, d)
            x = self._x[:b * d].view(blocks, rows, d)
            weight_grad = (self._partial[:blocks * k * d].view(blocks, k, d) if blocks > 1
                           else self.weight_grads[i][None])
            taps.append((gathered.view(torch.int16), gathered.view(x.shape), x, x.transpose(1, 2),
                         self.weights[i].expand(blocks, k, d), self.biases[i],
                         self._logits[:blocks * k * rows].view(blocks, k, rows), weight_grad))
        return blocks, self._minus_one[:b].view(blocks, 1, rows), taps

    def step(self, caches: list[torch.Tensor], idx: torch.Tensor, y: torch.Tensor, lr: float, plan: tuple) -> None:
        """One SGD step on the rows `idx` of every tap's cache (int16 views), labels `y` (on the
        device), through the views of `_plan`; leaves each tap's summed log-probability of the labels
        in `_log_p`."""
        blocks, minus_one, taps = plan
        target = y.view(minus_one.shape)
        for i, (cache, (gathered, half_x, x, x_t, w, bias, logits, weight_grad)) in enumerate(zip(caches, taps)):
            torch.index_select(cache, 0, idx, out=gathered)
            x.copy_(half_x)
            logp = torch.log_softmax(torch.baddbmm(bias, w, x_t, out=logits), dim=1)
            torch.sum(logp.gather(1, target), dim=(0, 1, 2), out=self._log_p[i])
            g = logp.exp_()  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / B
            g.scatter_add_(1, target, minus_one)
            g.mul_(1.0 / len(idx))
            torch.bmm(g, x, out=weight_grad)
            if blocks > 1:  # the two row blocks' partial gradients
                torch.add(weight_grad[0], weight_grad[1], out=self.weight_grads[i])
            torch.sum(g, dim=(0, 2), out=self.bias_grads[i])
        # torch.optim.SGD's single-tensor update (no dampening, no Nesterov), on the flat buffer
        self.grads.add_(self.params, alpha=self.weight_decay)
        if self.velocity is None:
            self.velocity = self.grads.clone()
        else:
            self.velocity.mul_(self.momentum).add_(self.grads)
        self.params.add_(self.velocity, alpha=-lr)

    @torch.no_grad()
    def score(self, caches: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, tuple[float, float]]:
        """Top-1 / top-5 (%) per tap on standardised cached features (counted as `score` counts)."""
        n = len(labels)
        correct = {k: [0, 0] for k in self.names}
        for start in range(0, n, self.max_batch):
            y = labels[start:start + self.max_batch].to(self.device)
            b = len(y)
            blocks = self._blocks(b)
            for i, name in enumerate(self.names):
                x = self._x[:b * self.dims[i]].view(blocks, b // blocks, self.dims[i])
                x.copy_(caches[name][start:start + b].view(x.shape))
                logits = self._logits_of(i, x).transpose(1, 2).reshape(b, self.classes)
                c1, c5 = topk_correct(logits, y)
                correct[name][0] += c1
                correct[name][1] += c5
        return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}
