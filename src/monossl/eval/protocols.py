"""Probe protocols: everything that defines a linear-probe result besides the trunk, the data
and the seed (PAPER.md §4), and the train/test transforms each protocol implies.

What differs between published probe results is the *protocol* (pooling, schedule,
augmentation, test crops), so every result records its `ProbeProtocol`; results of different
protocols are not comparable.

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

`DEFAULT_PROTOCOL` names each architecture's preset; `check_trunk` refuses a trunk a protocol
is not meant for with a one-line error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F

from monossl.errors import UserError
from monossl.models import Trunk

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
        assert self.size is not None  # an adaptive pool has a size or a number of values
        return self.size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "adaptive-avg":
            return F.adaptive_avg_pool2d(x, self.side(x.shape[1], x.shape[2]))
        if self.kind == "adaptive-max":
            return F.adaptive_max_pool2d(x, self.side(x.shape[1], x.shape[2]))
        if self.kind == "avg":
            assert self.kernel is not None  # a fixed pool has its kernel
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding)
        if self.kind == "max":
            assert self.kernel is not None
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
        changed = self
        if epochs is not None and epochs != self.epochs:
            if epochs < 1:
                raise UserError(f"--epochs must be at least 1, got {epochs}")
            milestones = tuple(sorted({max(1, round(m * epochs / self.epochs)) for m in self.milestones
                                       if round(m * epochs / self.epochs) < epochs}))
            changed = dataclasses.replace(changed, epochs=epochs, milestones=milestones)
        if lr is not None:
            if not lr > 0:
                raise UserError(f"--lr must be positive, got {lr}")
            changed = dataclasses.replace(changed, lr=lr)
        if batch_size is not None:
            if batch_size < 2:
                raise UserError(f"--batch-size must be at least 2, got {batch_size}")
            changed = dataclasses.replace(changed, batch_size=batch_size)
        if weight_decay is not None:
            changed = dataclasses.replace(changed, weight_decay=weight_decay)
        return changed

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


class _Schedule(TypedDict):
    """ProbeProtocol fields that several protocols share."""

    epochs: int
    lr: float
    milestones: tuple[int, ...]
    weight_decay: float
    batch_size: int
    train_aug: str
    input_size: int
    test_resize: int
    test_crops: int


ALEXNETS = ("alexnet-big", "alexnet-small")
_ALEX_SCHEDULE = _Schedule(epochs=36, lr=0.01, milestones=(10, 20, 30), weight_decay=1e-5, batch_size=192,
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
    "resnet-cifar": ProbeProtocol(
        name="resnet-cifar", archs=("resnet18-cifar",),
        pools={tap: Pool("adaptive-avg", values=4096) for tap in ("conv1", "layer1", "layer2", "layer3", "layer4")},
        epochs=25, lr=0.01, milestones=(15, 20), weight_decay=5e-4, batch_size=256, bn_stats="dataset",
        description="the `cifar` protocol on ResNet-18's taps (stem, layer1..layer4): adaptive average pooling "
                    "to >= 4096 values (64x8x8, 64x8x8, 128x6x6, 256x4x4, 512x3x3)",
    ),
    "resnet-avg": ProbeProtocol(
        name="resnet-avg", archs=("resnet18",),
        pools={tap: Pool("adaptive-avg", values=9216) for tap in ("conv1", "layer1", "layer2", "layer3", "layer4")},
        description="ResNet-18 at 224 px: adaptive average pooling of every tap to >= 9216 values, the AlexNet "
                    "probes' schedule and ten test crops",
        **_ALEX_SCHEDULE,
    ),
}
DEFAULT_PROTOCOL = {"cifar": "cifar", "alexnet-big": "asano-max", "alexnet-small": "asano-max",
                    "resnet18-cifar": "resnet-cifar", "resnet18": "resnet-avg"}


def get_protocol(name: str) -> ProbeProtocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise UserError(f"unknown probe protocol {name!r}; choose from {', '.join(PROTOCOLS)}") from None


def check_trunk(trunk: Trunk, protocol: ProbeProtocol, where: str = "the trunk") -> None:
    """One-line error when the trunk is not what the protocol is for."""
    if trunk.arch not in protocol.archs:
        hint = DEFAULT_PROTOCOL.get(trunk.arch)
        raise UserError(f"{where} is a {trunk.arch} trunk, but protocol {protocol.name} is for "
                        f"{'/'.join(protocol.archs)} trunks" + (f" (use --protocol {hint})" if hint else ""))
    missing = [t for t in protocol.pools if t not in trunk.tap_names]
    if missing:
        raise UserError(f"{where} has no tap(s) {', '.join(missing)} that protocol {protocol.name} probes")


# ----------------------------------------------------------------------------- transforms


class _StackCrops:
    """Tuple of crops (from TenCrop) -> one (n_crops, C, H, W) tensor."""

    def __call__(self, crops: Sequence[torch.Tensor]):
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
