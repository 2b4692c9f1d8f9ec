"""The linear probes themselves and how they are scored.

`LinearProbes` holds one `BatchNorm1d(d, affine=False)` + `Linear(d, classes)` per tap (the
heads share no parameters, so training them together on the summed cross-entropy trains each
as if alone). `score` counts top-1/top-5 over batches of features, averaging the logits of an
image's test crops first (`average_crop_logits`) and summing the counts over ranks under torchrun.
`FusedHeads` trains the Linear layers on standardised caches with a hand-written gradient, its
matmuls in fp32 (on an fp16 cache, for CPUs without bf16) or bf16 (on a bf16 cache).
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


class FusedHeads:
    """The trainer of a `LinearProbes`' Linear layers on standardised cached features, with a hand-written
    gradient: the same model as the autograd loop up to float rounding (each head on its own
    cross-entropy, torch.optim.SGD's momentum and weight decay, the same minibatches), in less than
    half its time (measured: docs/probes.md, "The fp32 path"). Its matmuls run in `matmul_dtype`:

      * fp32 (CPUs without bf16): the cache is fp16, each tap's rows are converted to fp32;
      * bf16 (CUDA, CPUs with bf16): the cache is bf16 and read as it is, the fp32 weights are rounded
        to bf16 once a step, and the products come out bf16 as under autocast; the softmax, the
        weights, their gradients and the optimiser stay fp32.

    What makes it fast:

      * the gradient is written by hand, which pays here: cross-entropy's is (softmax - onehot) / B
        and the weights' is g @ x, so a step is ~12 ops per tap and 3 for the SGD update of all
        parameters (one flat buffer) instead of autograd's graph and a per-parameter optimiser;
      * a tap at a time: gather its rows (converting them for fp32), forward, gradient and backward
        while that block is still in cache, through one reused buffer;
      * logits as W @ x.T, (classes, B): MKL runs that skinny product ~2x faster than x @ W.T;
      * with 2+ threads the minibatch is split in two row blocks multiplied by one bmm: MKL runs a
        single skinny product on one core, bmm runs the two blocks side by side.
    """

    def __init__(self, probes: LinearProbes, device: torch.device, momentum: float, weight_decay: float,
                 max_batch: int, matmul_dtype: torch.dtype = torch.float32):
        if matmul_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"FusedHeads multiplies in float32 or bfloat16, not {matmul_dtype}")
        self.names = list(probes.heads)
        linears = [probes.head(k)[1] for k in self.names]
        self.dims = [lin.in_features for lin in linears]
        self.classes = classes = linears[0].out_features
        self.momentum, self.weight_decay = momentum, weight_decay
        self.dtype = matmul_dtype
        # the cache's dtype: fp16 converted to fp32 rows, or bf16 multiplied as it is
        self.cache_dtype = torch.float16 if matmul_dtype == torch.float32 else matmul_dtype
        n_weights = classes * sum(self.dims)
        self.params = torch.empty(n_weights + classes * len(self.dims), device=device)  # weights, then biases
        self.grads = torch.empty_like(self.params)
        # SGD's momentum buffer, created at the first step as torch.optim.SGD does
        self.velocity: torch.Tensor | None = None
        # the weights as the matmuls read them: the fp32 weights themselves, or their bf16 rounding
        self._low = self.params[:n_weights] if matmul_dtype == torch.float32 else \
            torch.empty(n_weights, dtype=matmul_dtype, device=device)
        self.weights, self.weight_grads, self._matmul_weights, start = [], [], [], 0
        for d in self.dims:
            self.weights.append(self.params[start:start + classes * d].view(classes, d))
            self.weight_grads.append(self.grads[start:start + classes * d].view(classes, d))
            self._matmul_weights.append(self._low[start:start + classes * d].view(classes, d))
            start += classes * d
        self.biases = self.params[n_weights:].view(len(self.dims), classes, 1)  # broadcast over the batch
        self.bias_grads = self.grads[n_weights:].view(len(self.dims), classes)
        with torch.no_grad():
            for w, b, lin in zip(self.weights, self.biases, linears):
                w.copy_(lin.weight)
                b.copy_(lin.bias[:, None])
        self.max_batch, self.device = max_batch, device
        self._x = torch.empty(max_batch * max(self.dims), dtype=matmul_dtype, device=device)  # one tap's rows
        self._logits = torch.empty(classes * max_batch, dtype=matmul_dtype, device=device)
        # the row blocks' gradients (and for bf16 the product before it is widened to fp32)
        self._partial = torch.empty(2 * classes * max(self.dims), dtype=matmul_dtype, device=device)
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
        """One epoch of SGD steps on the standardised caches (`cache_dtype`: fp16 for fp32 matmuls, bf16
        for bf16 ones) over the given minibatches (index tensors); returns ({tap: summed cross-entropy
        over the epoch's images}, images seen)."""
        if any(caches[k].dtype != self.cache_dtype for k in self.names):
            raise ValueError(f"FusedHeads multiplying in {self.dtype} trains on {self.cache_dtype} caches")
        rows = [caches[k].view(torch.int16) for k in self.names]  # gathered as int16: the same bytes, a faster kernel
        store = rows[0].device
        # gathered rows: converted into _x after the gather (fp16), or gathered into _x itself (bf16 on its device)
        half = self._x if self.dtype != torch.float32 and store == self.device else \
            torch.empty(len(self._x), dtype=self.cache_dtype, device=store)
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

    def _round_weights(self) -> None:
        """For bf16 matmuls: the current fp32 weights rounded to bf16, as autocast rounds them (fp32: the
        matmuls read the weights themselves)."""
        if self.dtype != torch.float32:
            self._low.copy_(self.params[:len(self._low)])

    def _forward(self, x_t: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, low: torch.Tensor,
                 logits: torch.Tensor) -> torch.Tensor:
        """fp32 logits (blocks, classes, rows) of the row blocks x_t (blocks, d, rows) into `logits`: one
        baddbmm in fp32; in bf16 the product into `low`, then the bias added in fp32."""
        if self.dtype == torch.float32:
            return torch.baddbmm(bias, w, x_t, out=logits)
        return torch.add(torch.bmm(w, x_t, out=low), bias, out=logits)

    def _plan(self, b: int, half: torch.Tensor) -> tuple:
        """The views a step of b rows works through, made once per batch size (views cost Python time)."""
        blocks = self._blocks(b)
        k, rows = self.classes, b // blocks
        fp32 = self.dtype == torch.float32
        low = self._logits[:blocks * k * rows].view(blocks, k, rows)
        logits = low if fp32 else torch.empty(blocks, k, rows, device=self.device)
        taps = []
        for i, d in enumerate(self.dims):
            gathered = half[:b * d].view(b, d)
            x = self._x[:b * d].view(blocks, rows, d)
            # fp32 with one block: the product is the gradient itself; else the blocks' products, summed after
            weight_grad = self.weight_grads[i][None] if fp32 and blocks == 1 else \
                self._partial[:blocks * k * d].view(blocks, k, d)
            half_x = None if gathered.data_ptr() == x.data_ptr() else gathered.view(x.shape)  # None: gathered into x
            taps.append((gathered.view(torch.int16), half_x, x, x.transpose(1, 2),
                         self._matmul_weights[i].expand(blocks, k, d), self.biases[i], low, logits, weight_grad))
        return blocks, self._minus_one[:b].view(blocks, 1, rows), taps

    def step(self, caches: list[torch.Tensor], idx: torch.Tensor, y: torch.Tensor, lr: float, plan: tuple) -> None:
        """One SGD step on the rows `idx` of every tap's cache (int16 views), labels `y` (on the
        device), through the views of `_plan`; leaves each tap's summed log-probability of the labels
        in `_log_p`."""
        blocks, minus_one, taps = plan
        target = y.view(minus_one.shape)
        self._round_weights()
        for i, (cache, (gathered, half_x, x, x_t, w, bias, low, logits, weight_grad)) in enumerate(zip(caches, taps)):
            torch.index_select(cache, 0, idx, out=gathered)
            if half_x is not None:
                x.copy_(half_x)
            logp = torch.log_softmax(self._forward(x_t, w, bias, low, logits), dim=1)
            torch.sum(logp.gather(1, target), dim=(0, 1, 2), out=self._log_p[i])
            g = logp.exp_()  # d(mean cross-entropy)/d(logits) = (softmax - onehot) / B
            g.scatter_add_(1, target, minus_one)
            g.mul_(1.0 / len(idx))
            torch.sum(g, dim=(0, 2), out=self.bias_grads[i])
            torch.bmm(g if self.dtype == torch.float32 else low.copy_(g), x, out=weight_grad)
            if weight_grad.data_ptr() != self.weight_grads[i].data_ptr():  # the blocks' products, summed in fp32
                torch.sum(weight_grad, dim=0, dtype=torch.float32, out=self.weight_grads[i])
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
        n, k = len(labels), self.classes
        correct = {name: [0, 0] for name in self.names}
        self._round_weights()
        for start in range(0, n, self.max_batch):
            y = labels[start:start + self.max_batch].to(self.device)
            b = len(y)
            blocks = self._blocks(b)
            rows = b // blocks
            low = self._logits[:blocks * k * rows].view(blocks, k, rows)
            out = low if self.dtype == torch.float32 else torch.empty(blocks, k, rows, device=self.device)
            for i, name in enumerate(self.names):
                x = self._x[:b * self.dims[i]].view(blocks, rows, self.dims[i])
                x.copy_(caches[name][start:start + b].view(x.shape))
                w = self._matmul_weights[i].expand(blocks, k, self.dims[i])
                logits = self._forward(x.transpose(1, 2), w, self.biases[i], low, out)
                c1, c5 = topk_correct(logits.transpose(1, 2).reshape(b, k), y)
                correct[name][0] += c1
                correct[name][1] += c5
        return {name: (100.0 * c1 / n, 100.0 * c5 / n) for name, (c1, c5) in correct.items()}
