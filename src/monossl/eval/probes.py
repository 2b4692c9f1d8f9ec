"""Linear probes on every conv tap of a frozen trunk (PAPER.md §4); `monossl probe`.

The trunk is frozen and in eval mode. All taps are read in one forward pass; each tap's
post-ReLU map is pooled to a few thousand values (`Pool`), flattened, passed through
`BatchNorm1d(d, affine=False)` and one `Linear(d, classes)`. All the probes train together
(the summed cross-entropy; the heads share no parameters, so each trains as if alone) with
SGD, momentum 0.9 and a step schedule. What differs between published results is the
*protocol* (pooling, schedule, augmentation, test crops), so every result records its
`ProbeProtocol`; results of different protocols are not comparable.

Presets (`PROTOCOLS`, see docs/probes.md):

    cifar            ours, for the CIFAR trunk on 32-px data: adaptive average pooling of each
                     tap to the smallest side giving >= 4096 values (32-64-128-256 channels:
                     32x12x12=4608, 64x8x8=4096, 128x6x6=4608, 256x4x4=4096), no augmentation,
                     1 test crop -> features cached once in fp16.
    asano-max        the authors' AlexNet probe: max-pool (k,s,p) conv1 (6,6,3) conv2 (4,4,0)
                     conv3 (3,3,1) conv4 (3,3,1) conv5 (2,2,0) -> 9600/9216/9600/9600/9216 on
                     alexnet-big; 36 epochs, lr 0.01 /10 at 10,20,30, wd 1e-5, batch 192;
                     RandomResizedCrop 224 + flip; test resize 256 + ten crops, logits averaged.
    zhang-avg        the same with average pooling (Zhang et al. 2017, DeepCluster's eval_linear).
    rotnet-adaptive  adaptive max-pool to 12/7/5/6/6 spatial (RotNet); same schedule.

Two paths, the same training loop:
  * cached (no train augmentation and one test crop, e.g. `cifar`): the pooled features of
    train and test are extracted once, in chunks, stored fp16, and every epoch draws its
    minibatches from that cache (cast to fp32 per batch);
  * streaming (augmentation or ten crops): every batch goes through the frozen trunk.
Both draw the same minibatches (a seeded permutation per epoch) and round features to fp16,
so for a no-augmentation protocol they give the same probes up to float noise.

Library use (what `monossl compare` calls):

    result = run_probe(trunk, train, test, get_protocol("cifar"), device="auto", seed=0,
                       out_dir=None, progress=True)
    result["taps"]["conv2"]["top1"]      # final-epoch top-1 (%)

`result` is what results.json holds; `results_markdown(result)` is results.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.distributed import all_sum, average_gradients, gather_rows, is_main, shard_range, world
from monossl.errors import UserError

# ----------------------------------------------------------------------------- pooling


@dataclass(frozen=True)
class Pool:
    """How one tap is pooled before its probe.

    kind: "adaptive-avg" / "adaptive-max" (to `size` x `size`), "avg" / "max" (`kernel`,
    `stride`, `padding`; avg counts padding, as DeepCluster's eval_linear), or "none".
    Instead of `size`, adaptive pools may take `values`: the side is then the smallest that
    gives at least that many values for the tap's channel count, ceil(sqrt(values / C)), at
    most the map's own side. That keeps every tap near the same size whatever the widths.
    """

    kind: str
    size: int | None = None
    values: int | None = None
    kernel: int | None = None
    stride: int | None = None
    padding: int = 0

    def side(self, channels: int, height: int) -> int:
        if self.values is not None:
            return min(height, math.ceil(math.sqrt(self.values / channels)))
        return self.size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "adaptive-avg":
            return F.adaptive_avg_pool2d(x, self.side(x.shape[1], x.shape[2]))
        if self.kind == "adaptive-max":
            return F.adaptive_max_pool2d(x, self.side(x.shape[1], x.shape[2]))
        if self.kind == "avg":
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding)
        if self.kind == "max":
            return F.max_pool2d(x, self.kernel, self.stride, self.padding)
        if self.kind == "none":
            return x
        raise ValueError(f"unknown pooling kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind.startswith("adaptive") and self.values is not None:
            return f"{self.kind} to >= {self.values} values"
        if self.kind.startswith("adaptive"):
            return f"{self.kind} {self.size}x{self.size}"
        if self.kind in ("avg", "max"):
            return f"{self.kind}-pool k{self.kernel} s{self.stride} p{self.padding}"
        return self.kind


# ----------------------------------------------------------------------------- protocols


@dataclass(frozen=True)
class ProbeProtocol:
    """Everything that defines a probe result besides the trunk, the data and the seed."""

    name: str
    archs: tuple[str, ...]  # trunk architectures it is meant for
    pools: dict[str, Pool]  # tap name -> pooling
    epochs: int
    lr: float
    milestones: tuple[int, ...]  # epochs after which lr *= gamma
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    train_aug: str = "none"  # "none" | "rrc-flip" (RandomResizedCrop(input_size) + horizontal flip)
    input_size: int = 32
    test_resize: int | None = None  # shorter side resized to this before the test crop(s)
    test_crops: int = 1  # 1 (centre crop) | 10 (TenCrop, logits averaged)
    eval_every: int = 1  # evaluate on test every N epochs (the final epoch always)
    # BatchNorm1d(affine=False) statistics: "batch" = the usual train-mode BN (minibatch statistics,
    # running averages at test time), "dataset" = the exact mean/variance of the training features,
    # computed once and then fixed (BN in eval mode throughout; with the cache this standardises
    # the cached features once, which makes each step about twice as fast on CPU)
    bn_stats: str = "batch"
    description: str = ""

    @property
    def cacheable(self) -> bool:
        return self.train_aug == "none" and self.test_crops == 1

    def with_overrides(self, epochs: int | None = None, lr: float | None = None,
                       batch_size: int | None = None, weight_decay: float | None = None) -> ProbeProtocol:
        """A copy with some settings changed; milestones scale with a new epoch count."""
        changes = {}
        if epochs is not None and epochs != self.epochs:
            if epochs < 1:
                raise UserError(f"--epochs must be at least 1, got {epochs}")
            changes["epochs"] = epochs
            changes["milestones"] = tuple(sorted({max(1, round(m * epochs / self.epochs)) for m in self.milestones
                                                  if round(m * epochs / self.epochs) < epochs}))
        if lr is not None:
            if not lr > 0:
                raise UserError(f"--lr must be positive, got {lr}")
            changes["lr"] = lr
        if batch_size is not None:
            if batch_size < 2:
                raise UserError(f"--batch-size must be at least 2, got {batch_size}")
            changes["batch_size"] = batch_size
        if weight_decay is not None:
            changes["weight_decay"] = weight_decay
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pools"] = {k: {kk: vv for kk, vv in dataclasses.asdict(p).items() if vv is not None}
                      for k, p in self.pools.items()}
        return d

    def summary(self) -> str:
        aug = "no augmentation" if self.train_aug == "none" else f"train {self.train_aug} {self.input_size}"
        crops = "1 crop" if self.test_crops == 1 else f"{self.test_crops} crops (logits averaged)"
        ms = ",".join(map(str, self.milestones)) or "none"
        return (f"{self.name}: {self.epochs} epochs, SGD lr {self.lr:g} (x{self.gamma:g} after epochs {ms}), "
                f"momentum {self.momentum:g}, wd {self.weight_decay:g}, batch {self.batch_size}, {aug}, test {crops}")


ALEXNETS = ("alexnet-big", "alexnet-small")
_ALEX_SCHEDULE = dict(epochs=36, lr=0.01, milestones=(10, 20, 30), weight_decay=1e-5, batch_size=192,
                      train_aug="rrc-flip", input_size=224, test_resize=256, test_crops=10)
_ALEX_KSP = {"conv1": (6, 6, 3), "conv2": (4, 4, 0), "conv3": (3, 3, 1), "conv4": (3, 3, 1), "conv5": (2, 2, 0)}

PROTOCOLS: dict[str, ProbeProtocol] = {
    "cifar": ProbeProtocol(
        name="cifar", archs=("cifar",),
        pools={tap: Pool("adaptive-avg", values=4096) for tap in ("conv1", "conv2", "conv3", "conv4")},
        epochs=25, lr=0.01, milestones=(15, 20), weight_decay=5e-4, batch_size=256, bn_stats="dataset",
        description="ours, for the CIFAR trunk on 32-px data: adaptive average pooling of each tap to "
                    "ceil(sqrt(4096/C))^2 positions (64-128-256-512 channels: 8/6/4/3, 4096-4608 values), "
                    "no augmentation, features cached once (fp16), BatchNorm with exact train-set statistics",
    ),
    "asano-max": ProbeProtocol(
        name="asano-max", archs=ALEXNETS,
        pools={k: Pool("max", kernel=a, stride=b, padding=c) for k, (a, b, c) in _ALEX_KSP.items()},
        description="Asano et al.'s AlexNet probe: max pooling to ~9k values (9600/9216/9600/9600/9216 on alexnet-big)",
        **_ALEX_SCHEDULE,
    ),
    "zhang-avg": ProbeProtocol(
        name="zhang-avg", archs=ALEXNETS,
        pools={k: Pool("avg", kernel=a, stride=b, padding=c) for k, (a, b, c) in _ALEX_KSP.items()},
        description="Zhang et al. 2017 / DeepCluster: average pooling to ~9k values, same schedule as asano-max",
        **_ALEX_SCHEDULE,
    ),
    "rotnet-adaptive": ProbeProtocol(
        name="rotnet-adaptive", archs=ALEXNETS,
        pools={k: Pool("adaptive-max", s) for k, s in zip(_ALEX_KSP, (12, 7, 5, 6, 6))},
        description="Gidaris et al. (RotNet): adaptive max pooling to 12/7/5/6/6 spatial, same schedule as asano-max",
        **_ALEX_SCHEDULE,
    ),
}
DEFAULT_PROTOCOL = {"cifar": "cifar", "alexnet-big": "asano-max", "alexnet-small": "asano-max"}


def get_protocol(name: str) -> ProbeProtocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UserError(f"unknown probe protocol {name!r}; choose from {', '.join(PROTOCOLS)}") from None


def check_trunk(trunk, protocol: ProbeProtocol, where: str = "the trunk") -> None:
    """One-line error when the trunk is not what the protocol is for."""
    if trunk.arch not in protocol.archs:
        hint = DEFAULT_PROTOCOL.get(trunk.arch)
        raise UserError(f"{where} is a {trunk.arch} trunk, but protocol {protocol.name} is for "
                        f"{'/'.join(protocol.archs)} trunks" + (f" (use --protocol {hint})" if hint else ""))
    missing = [t for t in protocol.pools if t not in trunk.tap_names]
    if missing:
        raise UserError(f"{where} has no tap(s) {', '.join(missing)} that protocol {protocol.name} probes")


# ----------------------------------------------------------------------------- features


def pooled_features(trunk, x: torch.Tensor, pools: dict[str, Pool]) -> dict[str, torch.Tensor]:
    """{tap: (B, d) pooled, flattened activation}, all taps from one forward pass."""
    acts = trunk.taps(x, list(pools))
    return {name: pool(acts[name]).flatten(1) for name, pool in pools.items()}


@torch.no_grad()
def pooled_shapes(trunk, protocol: ProbeProtocol, image_size: int | None = None) -> dict[str, dict]:
    """{tap: {"shape": (C, H, W), "pooled_shape": (C, h, w), "pooled_size": C*h*w}} from one dummy image."""
    size = image_size or protocol.input_size
    was_training = trunk.training
    trunk.eval()
    try:
        p = next(trunk.parameters())
        x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
        acts = trunk.taps(x, list(protocol.pools))
    finally:
        trunk.train(was_training)
    out = {}
    for name, pool in protocol.pools.items():
        a = acts[name]
        try:
            pooled = pool(a)
        except RuntimeError as exc:
            raise UserError(f"protocol {protocol.name}: {pool.describe()} does not fit tap {name} of shape "
                            f"{tuple(a.shape[1:])}: {str(exc).splitlines()[0]}") from None
        out[name] = {"shape": list(a.shape[1:]), "pooled_shape": list(pooled.shape[1:]),
                     "pooled_size": int(pooled[0].numel())}
    return out


def _to_store(f: torch.Tensor) -> torch.Tensor:
    """Features are kept (cached or not) in fp16; activations are post-ReLU, so only clamp the top."""
    return f.clamp(max=65504.0).to(torch.float16)


def average_crop_logits(logits: torch.Tensor, n_crops: int) -> torch.Tensor:
    """(B * n_crops, K) logits of consecutive crops of each image -> (B, K) mean logits."""
    if n_crops == 1:
        return logits
    return logits.view(-1, n_crops, logits.shape[-1]).mean(1)


class _StackCrops:
    """Tuple of crops (from TenCrop) -> one (n_crops, C, H, W) tensor."""

    def __call__(self, crops):
        return torch.stack([torch.as_tensor(c) for c in crops])


def train_transform(protocol: ProbeProtocol):
    """Train-time transform (for PIL images or uint8 tensors) -> float (3, S, S) in [0, 1]."""
    from torchvision.transforms import v2

    s = protocol.input_size
    if protocol.train_aug == "rrc-flip":
        geo = [v2.RandomResizedCrop(s, antialias=True), v2.RandomHorizontalFlip()]
    elif protocol.train_aug == "none":
        geo = [v2.Resize(s, antialias=True), v2.CenterCrop(s)]
    else:
        raise ValueError(f"unknown train_aug {protocol.train_aug!r}")
    return v2.Compose([v2.ToImage(), *geo, v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


def test_transform(protocol: ProbeProtocol):
    """Test-time transform -> float (3, S, S), or (10, 3, S, S) for ten crops."""
    from torchvision.transforms import v2

    s = protocol.input_size
    steps = [v2.ToImage(), v2.Resize(protocol.test_resize or s, antialias=True),
             v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()]
    if protocol.test_crops == 10:
        steps += [v2.TenCrop(s), _StackCrops()]
    elif protocol.test_crops == 1:
        steps += [v2.CenterCrop(s)]
    else:
        raise ValueError(f"test_crops must be 1 or 10, got {protocol.test_crops}")
    return v2.Compose(steps)


def _native_size(dataset) -> int | None:
    """The image side of an in-memory dataset whose items need no transform, else None."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == images.shape[-2]:
        return int(images.shape[-1])
    return None


# ----------------------------------------------------------------------------- probes


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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The minibatches (index tensors) of one epoch: a seeded permutation; a last batch of 1 is dropped
    (BatchNorm cannot train on it)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    batches = list(torch.randperm(n, generator=g).split(batch_size))
    if len(batches[-1]) < 2:
        batches.pop()
    return batches


class _Batches(torch.utils.data.Sampler):
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self):
        return len(self.batches)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == y[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


def _bar(total, desc, enabled, unit="it"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False)


class _Runner:
    """The frozen trunk, the data and the protocol of one probe run; yields features and scores."""

    def __init__(self, trunk, train, test, protocol, device, seed, progress, workers):
        self.trunk, self.train, self.test = trunk, train, test
        self.protocol, self.device, self.seed = protocol, device, seed
        self.progress, self.workers = progress, workers

    # -- one batch of images -> features (fp16-rounded, as stored)
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from monossl.device import autocast

        # channels-last: measured faster for these convs on CPU (oneDNN) as on CUDA
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            feats = pooled_features(self.trunk, x, self.protocol.pools)
        return {k: _to_store(v.float()) for k, v in feats.items()}

    def loader(self, dataset, transform, batch_sampler=None, batch_size=None, epoch=0):
        kw = dict(num_workers=self.workers, pin_memory=self.device.type == "cuda")
        if self.workers:  # worker seeds (hence random crops) from the seed and the epoch
            kw["generator"] = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset.with_transform(transform), batch_sampler=batch_sampler, **kw)
        return torch.utils.data.DataLoader(dataset.with_transform(transform), batch_size=batch_size,
                                           shuffle=False, **kw)

    def _native(self, dataset) -> bool:
        return _native_size(dataset) == self.protocol.input_size

    # -- cached path
    def extract(self, dataset, dims: dict[str, int], desc: str) -> dict[str, torch.Tensor]:
        """fp16 features of every image; under torchrun each rank extracts one block and all get all."""
        total = len(dataset)
        if world()[1] > 1:
            start, stop = shard_range(total)
            cache = self._extract(dataset.restricted(torch.arange(start, stop)), dims, desc)
            return {k: gather_rows(v, total) for k, v in cache.items()}
        return self._extract(dataset, dims, desc)

    def _extract(self, dataset, dims: dict[str, int], desc: str) -> dict[str, torch.Tensor]:
        n = len(dataset)
        store = self.device if (self.device.type == "cuda" and _fits_on_gpu(n, dims)) else torch.device("cpu")
        cache = {k: torch.empty(n, d, dtype=torch.float16, device=store) for k, d in dims.items()}
        chunk = 256
        with _bar(n, desc, self.progress, unit="img") as bar:
            if self._native(dataset):  # in-memory uint8 images at the protocol's size: slice them
                batches = ((dataset.images[i:i + chunk].float().div_(255), None) for i in range(0, n, chunk))
            else:
                batches = self.loader(dataset, test_transform(self.protocol), batch_size=chunk)
            i = 0
            for x, _y in batches:
                for k, v in self.features(x).items():
                    cache[k][i:i + len(x)] = v.to(store)
                i += len(x)
                bar.update(len(x))
        return cache

    def cached_batches(self, cache, labels, batches, dtype=torch.float32):
        # Reused gather buffers: fresh multi-MB tensors every step cost page faults (sys time) on CPU.
        # Reusing them is safe: the previous step's backward is done before the next gather.
        bufs = {}
        for idx in batches:
            feats = {}
            for k, v in cache.items():
                b = len(idx)
                if k not in bufs or bufs[k][0].shape[0] < b:
                    gathered = torch.empty(b, v.shape[1], dtype=v.dtype, device=v.device)
                    converted = gathered if v.dtype == dtype and v.device == self.device else \
                        torch.empty(b, v.shape[1], dtype=dtype, device=self.device)
                    bufs[k] = (gathered, converted)
                half, full = bufs[k][0][:b], bufs[k][1][:b]
                # 16-bit rows gathered as int16: the same bytes, and a faster index_select kernel on CPU
                torch.index_select(v.view(torch.int16), 0, idx.to(v.device), out=half.view(torch.int16))
                if full is not half:
                    full.copy_(half)  # blocking: `half` is reused at the next step
                feats[k] = full
            yield feats, labels[idx].to(self.device)

    def cached_eval(self, probes, cache, labels, standardized, dtype=torch.float32):
        chunk = 1024
        batches = (({k: v[i:i + chunk].to(self.device, dtype) for k, v in cache.items()}, labels[i:i + chunk])
                   for i in range(0, len(labels), chunk))
        with _matmul_precision(self.device, dtype):
            return _score(probes, batches, len(labels), 1, self.device, standardized)

    # -- streaming path
    def streamed_batches(self, batches, epoch):
        rank, size = world()
        if size > 1:  # each rank trains on its rows of every global batch; gradients are averaged
            batches = [idx[rank::size] for idx in batches]
        if self._native(self.train) and self.protocol.train_aug == "none":
            # no augmentation on in-memory data at its own size: exactly the cache path's images
            for idx in batches:
                x = self.train.images[idx].float().div_(255)
                yield {k: v.float() for k, v in self.features(x).items()}, self.train.labels[idx].to(self.device)
            return
        for x, y in self.loader(self.train, train_transform(self.protocol), batch_sampler=_Batches(batches),
                                epoch=epoch):
            yield {k: v.float() for k, v in self.features(x).items()}, y.to(self.device)

    def streamed_eval(self, probes):
        n_crops = self.protocol.test_crops
        bs = max(1, self.protocol.batch_size // n_crops)
        test = self.test
        if world()[1] > 1:  # each rank scores one block of the test set; _score sums the counts
            test = test.restricted(torch.arange(*shard_range(len(test))))
        if self._native(test) and n_crops == 1 and not self.protocol.test_resize:
            it = ((test.images[i:i + bs].float().div_(255), test.labels[i:i + bs])
                  for i in range(0, len(test), bs))
        else:
            it = self.loader(test, test_transform(self.protocol), batch_size=bs)

        def batches():
            for x, y in it:
                if x.ndim == 5:  # (B, crops, C, H, W) -> (B * crops, C, H, W), crops of an image consecutive
                    x = x.flatten(0, 1)
                yield {k: v.float() for k, v in self.features(x).items()}, y

        return _score(probes, batches(), len(self.test), n_crops, self.device, False, sharded=world()[1] > 1)


def probe_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the probes' matmuls on standardised cached features where the hardware does bf16
    (CUDA; CPUs with oneDNN bf16 support, e.g. AVX512-BF16 or AMX); fp32 elsewhere. Weights,
    gradients and the optimiser stay fp32. On this project's 2-core AVX512-BF16 CPU it makes probe
    training about 4x faster per matmul (benchmarks/bench_probe.py); the features are fp16-rounded
    already, and bf16 products change final top-1 by about a tenth of a point (docs/probes.md)."""
    if device.type == "cuda":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch build without oneDNN
        return torch.float32


def _matmul_precision(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _score(probes, batches, n, n_crops, device, standardized, sharded=False) -> dict[str, tuple[float, float]]:
    """Top-1 / top-5 (%) per tap over `batches` of (features, labels); `sharded`: the ranks hold
    disjoint parts of the n images and the counts are summed over ranks."""
    correct = {k: [0, 0] for k in probes.heads}
    with torch.no_grad():
        for feats, y in batches:
            y = y.to(device)
            for k, lg in probes(feats, standardized=standardized).items():
                c1, c5 = _topk_correct(average_crop_logits(lg.float(), n_crops), y)
                correct[k][0] += c1
                correct[k][1] += c5
    if sharded:  # each rank scored its block of the test set
        counts = all_sum(torch.tensor([correct[k] for k in correct], dtype=torch.float64))
        correct = {k: c.tolist() for k, c in zip(correct, counts)}
    return {k: (100.0 * c1 / n, 100.0 * c5 / n) for k, (c1, c5) in correct.items()}


class _Moments:
    """Per-feature mean and biased variance, accumulated in float64 over chunks."""

    def __init__(self):
        self.n, self.s, self.ss = 0, {}, {}

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        for k, v in feats.items():
            v = v.double()
            self.s[k] = self.s.get(k, 0) + v.sum(0)
            self.ss[k] = self.ss.get(k, 0) + (v * v).sum(0)
        self.n += len(next(iter(feats.values())))

    def all_sum(self) -> None:
        """Under torchrun: the moments of every rank's part (each rank saw different images)."""
        self.s = {k: all_sum(v) for k, v in self.s.items()}
        self.ss = {k: all_sum(v) for k, v in self.ss.items()}
        self.n = int(all_sum(torch.tensor(float(self.n), dtype=torch.float64)).item())

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for k in self.s:
            mean = self.s[k] / self.n
            var = (self.ss[k] / self.n - mean * mean).clamp_(min=0)
            out[k] = (mean.float(), var.float())
        return out


def _cache_stats(cache: dict[str, torch.Tensor], chunk: int = 4096):
    m = _Moments()
    n = len(next(iter(cache.values())))
    for i in range(0, n, chunk):
        m.add({k: v[i:i + chunk] for k, v in cache.items()})
    return m.result()


def _standardize_(cache: dict[str, torch.Tensor], stats, eps: float, dtype=torch.float16, chunk: int = 4096) -> None:
    """cache[k] <- (cache[k] - mean) / sqrt(var + eps), i.e. what the fixed BatchNorm computes, stored
    in `dtype` (fp16, or bf16 when the probe's matmuls run in bf16: then the batches need no conversion)."""
    for k, v in cache.items():
        mean, var = stats[k]
        mean, rstd = mean.to(v.device), (var + eps).rsqrt().to(v.device)
        out = v if dtype == v.dtype else torch.empty(v.shape, dtype=dtype, device=v.device)
        for i in range(0, len(v), chunk):
            out[i:i + chunk] = ((v[i:i + chunk].float() - mean) * rstd).to(dtype)
        cache[k] = out


def _fits_on_gpu(n: int, dims: dict[str, int]) -> bool:
    try:
        free, _total = torch.cuda.mem_get_info()
    except Exception:  # pragma: no cover
        return False
    return n * sum(dims.values()) * 2 < 0.4 * free


def run_probe(trunk, train, test, protocol: ProbeProtocol | str = "cifar", device="auto", seed: int = 0,
              out_dir=None, progress: bool = True, verbose: bool = True, meta: dict | None = None,
              dataset: str | None = None, cache: bool = True, workers: int | None = None,
              return_probes: bool = False):
    """Train linear probes on every tap of a frozen `trunk`; returns the results dict.

    train / test: datasets of `monossl.data.datasets` (TensorImages or FolderImages, or any
    dataset with `.labels`, `.classes` and `with_transform`). protocol: a ProbeProtocol or a
    preset name. device: "auto"/"cpu"/"cuda" or a torch.device. out_dir: if given, results.json
    and results.md are written there (atomically). cache=False forces the streaming path
    (for checks). verbose prints the pooled sizes and the table; progress shows tqdm bars on a
    terminal. workers: DataLoader processes for transformed data (default: cores - 1, at most 8).
    The caller's trunk is not modified (a frozen copy is probed). Deterministic given the seed
    (on CPU). With return_probes=True returns (result, LinearProbes on the device).
    """
    from monossl.device import resolve_device

    t_start = time.perf_counter()
    verbose = verbose and is_main()  # under torchrun rank 0 speaks and writes
    progress = progress and is_main()
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    device = resolve_device(device) if isinstance(device, str) else device
    check_trunk(trunk, protocol)
    if protocol.bn_stats not in ("batch", "dataset"):
        raise ValueError(f"bn_stats must be 'batch' or 'dataset', not {protocol.bn_stats!r}")
    classes = list(train.classes)
    num_classes = len(classes)
    if list(test.classes) != classes:
        raise UserError(f"train and test have different classes ({len(classes)} vs {len(test.classes)})")
    if len(train) < 2 or len(test) < 1:
        raise UserError(f"too few images to probe: {len(train)} train, {len(test)} test")
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))

    frozen = copy.deepcopy(trunk).to(device).eval().requires_grad_(False)
    frozen = frozen.to(memory_format=torch.channels_last)
    shapes = pooled_shapes(frozen, protocol)
    dims = {k: v["pooled_size"] for k, v in shapes.items()}
    use_cache = cache and protocol.cacheable
    fixed = protocol.bn_stats == "dataset"
    # bf16 matmuls only on standardised cached features (no BatchNorm in the step)
    matmul_dtype = probe_matmul_dtype(device) if use_cache and fixed else torch.float32
    if verbose:
        print(f"probe {protocol.summary()}")
        print(f"  data: {dataset or getattr(train, 'source', '?')}: {len(train)} train / {len(test)} test, "
              f"{num_classes} classes; device {device}; seed {seed}; "
              f"{'cached' if use_cache else 'streamed'} features; BatchNorm statistics: {protocol.bn_stats}")
        for k, s in shapes.items():
            print(f"  {k}: {'x'.join(map(str, s['shape']))} -> {protocol.pools[k].describe()} -> "
                  f"{'x'.join(map(str, s['pooled_shape']))} = {s['pooled_size']} values")
        if use_cache:
            mb = (len(train) + len(test)) * sum(dims.values()) * 2 / 2**20
            print(f"  feature cache (fp16): {mb:.0f} MiB")

    runner = _Runner(frozen, train, test, protocol, device, seed, progress, workers)
    timings = {}
    history = []
    n_train = len(train)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transforms in the main process draw from the global RNG
        probes = LinearProbes(dims, num_classes, generator=torch.Generator().manual_seed(seed)).to(device)

        t0 = time.perf_counter()
        if use_cache:
            train_cache = runner.extract(train, dims, "features (train)")
            test_cache = runner.extract(test, dims, "features (test)")
            train_labels, test_labels = train.labels.clone(), test.labels.clone()
            if fixed:
                stats = _cache_stats(train_cache)
                probes.set_stats({k: (m.to(device), v.to(device)) for k, (m, v) in stats.items()})
                eps = probes.heads[next(iter(dims))][0].eps
                # stored as the matmuls will read them (bf16 or fp16): no per-step conversion
                store = torch.float16 if matmul_dtype == torch.float32 else matmul_dtype
                _standardize_(train_cache, stats, eps, store)
                _standardize_(test_cache, stats, eps, store)
        elif fixed:  # one pass over the training data (with its transform) for the statistics
            moments = _Moments()
            for feats, _y in runner.streamed_batches(epoch_batches(n_train, protocol.batch_size, seed, 0), 0):
                moments.add({k: v.cpu() for k, v in feats.items()})
            moments.all_sum()
            probes.set_stats({k: (m.to(device), v.to(device)) for k, (m, v) in moments.result().items()})
        timings["extract_s"] = round(time.perf_counter() - t0, 2)
        quiet_bars = not (progress and sys.stderr.isatty())  # then log a line per epoch instead
        if verbose and quiet_bars and (use_cache or fixed):
            print(f"  features{'' if use_cache else ' statistics'}: {timings['extract_s']:.0f} s", flush=True)

        opt = torch.optim.SGD(probes.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                              weight_decay=protocol.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(protocol.milestones), gamma=protocol.gamma)
        standardized = use_cache and fixed  # the cache already holds what the fixed BatchNorm outputs
        t0 = time.perf_counter()
        eval_s = 0.0
        steps_per_epoch = len(epoch_batches(n_train, protocol.batch_size, seed, 1))
        with _bar(protocol.epochs * steps_per_epoch, f"probe {protocol.name}", progress, unit="step") as bar:
            for epoch in range(1, protocol.epochs + 1):
                probes.train()
                batches = epoch_batches(n_train, protocol.batch_size, seed, epoch)
                it = (runner.cached_batches(train_cache, train_labels, batches, matmul_dtype) if use_cache
                      else runner.streamed_batches(batches, epoch))
                loss_sum = {k: 0.0 for k in dims}
                seen = 0
                lr = opt.param_groups[0]["lr"]
                for feats, y in it:
                    opt.zero_grad(set_to_none=True)
                    with _matmul_precision(device, matmul_dtype):
                        logits = probes(feats, standardized=standardized)
                    losses = {k: F.cross_entropy(lg.float(), y) for k, lg in logits.items()}
                    sum(losses.values()).backward()  # the heads are independent: each gets its own gradient
                    for k, loss in losses.items():
                        loss_sum[k] += loss.item() * len(y)
                    if not use_cache:  # streamed under torchrun: the ranks saw different rows
                        average_gradients(probes.parameters())
                    opt.step()
                    seen += len(y)
                    bar.update(1)
                sched.step()
                if not use_cache and world()[1] > 1:
                    sums = all_sum(torch.tensor([seen, *loss_sum.values()], dtype=torch.float64)).tolist()
                    seen, loss_sum = sums[0], dict(zip(loss_sum, sums[1:]))
                record = {"epoch": epoch, "lr": lr,
                          "loss": {k: round(v / max(seen, 1), 4) for k, v in loss_sum.items()}}
                if epoch % protocol.eval_every == 0 or epoch == protocol.epochs:
                    te = time.perf_counter()
                    probes.eval()
                    acc = (runner.cached_eval(probes, test_cache, test_labels, standardized, matmul_dtype) if use_cache
                           else runner.streamed_eval(probes))
                    eval_s += time.perf_counter() - te
                    record["top1"] = {k: round(a[0], 2) for k, a in acc.items()}
                    record["top5"] = {k: round(a[1], 2) for k, a in acc.items()}
                    bar.set_postfix_str(f"epoch {epoch} top-1 " + "/".join(f"{a[0]:.1f}" for a in acc.values()))
                    if verbose and quiet_bars:
                        print(f"  epoch {epoch}/{protocol.epochs} lr {lr:g}: top-1 "
                              + " ".join(f"{k} {a[0]:.1f}" for k, a in acc.items())
                              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
                history.append(record)
        timings["train_s"] = round(time.perf_counter() - t0, 2)
        timings["eval_s"] = round(eval_s, 2)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    probes.eval()

    final = history[-1]
    evaluated = [h for h in history if "top1" in h]
    taps = {}
    for k in dims:
        best = max(evaluated, key=lambda h: h["top1"][k])  # the first epoch reaching the maximum
        taps[k] = {**shapes[k], "top1": final["top1"][k], "top5": final["top5"][k],
                   "best_top1": best["top1"][k], "best_epoch": best["epoch"]}
    from monossl.runs import environment

    result = {
        "protocol": protocol.to_dict(),
        "seed": seed,
        "dataset": dataset or getattr(train, "source", None),
        "n_train": len(train),
        "n_test": len(test),
        "num_classes": num_classes,
        "trunk": {"arch": trunk.arch, "config": dict(getattr(trunk, "config", {})), "meta": dict(meta or {})},
        "taps": taps,
        "cached_features": use_cache,
        "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
        "device": str(device),
        "timings": timings,
        "history": history,
        "environment": environment(),
    }
    if verbose:
        print(results_markdown(result), end="")
        t = timings
        print(f"  time: {t['total_s']:.0f} s (features{' and statistics' if fixed and not use_cache else ''} "
              f"{t['extract_s']:.0f} s, probe training {t['train_s']:.0f} s incl. evaluation {t['eval_s']:.0f} s)")
    if out_dir is not None and is_main():
        write_results(out_dir, result)
        if verbose:
            print(f"  wrote {Path(out_dir) / 'results.json'} and results.md")
    return (result, probes) if return_probes else result


def results_markdown(result: dict) -> str:
    from monossl.runs import markdown_table

    p = result["protocol"]
    tr = result["trunk"]
    source = tr["meta"].get("method") or tr["meta"].get("source") or ""
    header = ["tap", "pooled size", "top-1 (final)", "top-5 (final)", "best top-1 (extra)", "best epoch"]
    rows = [[k, v["pooled_size"], float(v["top1"]), float(v["top5"]), float(v["best_top1"]), v["best_epoch"]]
            for k, v in result["taps"].items()]
    ms = ",".join(map(str, p["milestones"])) or "none"
    lines = [
        f"Linear probes, protocol `{p['name']}` ({p['epochs']} epochs, lr {p['lr']:g} x{p['gamma']:g} after {ms}, "
        f"wd {p['weight_decay']:g}, batch {p['batch_size']}, train aug {p['train_aug']}, test crops {p['test_crops']}); "
        f"trunk {tr['arch']}{' (' + source + ')' if source else ''}; data {result['dataset']} "
        f"({result['n_train']} train / {result['n_test']} test); seed {result['seed']}. "
        f"Top-1/top-5 at the final epoch; best top-1 over epochs is extra (optimistic).",
        "",
    ]
    return "\n".join(lines) + markdown_table(header, rows)


def write_results(out_dir, result: dict) -> None:
    from monossl.runs import ensure_writable_dir, write_json, write_text

    out = ensure_writable_dir(out_dir)
    write_json(out / "results.json", result)
    write_text(out / "results.md", results_markdown(result))


# ----------------------------------------------------------------------------- CLI


def configure(parser) -> None:
    from monossl.cli import positive
    from monossl.data.datasets import SPEC_HELP

    parser.add_argument("run_dir", nargs="?", help="a run directory (its trunk.pt) or a trunk checkpoint file")
    parser.add_argument("--random", action="store_true", help="probe a randomly initialised trunk (from --seed)")
    parser.add_argument("--arch", default=None, help="trunk architecture: for --random (default: the protocol's), "
                        "or the architecture RUN_DIR must hold")
    parser.add_argument("--widths", default=None, help="--random cifar trunk: channels of conv1..conv4")
    parser.add_argument("--conv1-kernel", type=positive(), default=None, help="--random cifar trunk: conv1 kernel size")
    parser.add_argument("--data", default="cifar10", help=f"labelled dataset: {SPEC_HELP} (default: cifar10)")
    parser.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                        help="probe protocol (default: cifar for the cifar trunk, asano-max for AlexNets)")
    parser.add_argument("--epochs", type=positive(), default=None, help="override the protocol's epochs (milestones scale)")
    parser.add_argument("--lr", type=positive(float), default=None, help="override the protocol's learning rate")
    parser.add_argument("--batch-size", type=positive(), default=None, help="override the protocol's batch size")
    parser.add_argument("--weight-decay", type=float, default=None, help="override the protocol's weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (and of the --random trunk)")
    parser.add_argument("--subset", type=positive(), default=None, metavar="N",
                        help="probe on a class-balanced subset of N training images")
    parser.add_argument("--test-subset", type=positive(), default=None, metavar="N",
                        help="evaluate on a class-balanced subset of N test images")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes for the augmentation path")
    parser.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 if not found")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/probe-<protocol>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from monossl.data.datasets import load_pair, subset
    from monossl.device import resolve_device
    from monossl.distributed import setup
    from monossl.models import ARCHS, build_trunk, load_trunk
    from monossl.runs import ensure_writable_dir

    if args.random and args.run_dir:
        raise UserError("give a RUN_DIR or --random, not both")
    if not args.random and not args.run_dir:
        raise UserError("give a RUN_DIR to probe, or --random --arch ARCH --out DIR")
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    device = setup(resolve_device(args.device))  # joins torchrun's process group, if any

    if args.random:
        if not args.out:
            raise UserError("--random needs --out DIR (there is no run directory to write into)")
        arch = args.arch or (get_protocol(args.protocol).archs[0] if args.protocol else "cifar")
        protocol = get_protocol(args.protocol or DEFAULT_PROTOCOL[arch])
        from monossl.models import trunk_config_from

        torch.manual_seed(args.seed)
        trunk = build_trunk(arch, **trunk_config_from(args.widths, args.conv1_kernel))
        meta = {"method": "random", "seed": args.seed}
        where = f"--random --arch {arch}"
        out = Path(args.out)
    else:
        trunk, meta = load_trunk(args.run_dir, expect_arch=args.arch)
        meta = {**meta, "source": str(args.run_dir)}
        protocol = get_protocol(args.protocol or DEFAULT_PROTOCOL.get(trunk.arch, "cifar"))
        where = str(args.run_dir)
        rd = Path(args.run_dir)
        out = Path(args.out) if args.out else (rd if rd.is_dir() else rd.parent) / f"probe-{protocol.name}"
    check_trunk(trunk, protocol, where)
    protocol = protocol.with_overrides(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                       weight_decay=args.weight_decay)

    train, test = load_pair(args.data, download=args.download)
    if args.subset:
        train = subset(train, args.subset, seed=args.seed)
    if args.test_subset:
        test = subset(test, args.test_subset, seed=args.seed)
    if is_main():
        ensure_writable_dir(out)  # only now: bad input leaves no empty directory behind
    run_probe(trunk, train, test, protocol, device=device, seed=args.seed, out_dir=out, progress=not args.quiet,
              meta=meta, dataset=args.data, workers=args.workers)
    return 0
