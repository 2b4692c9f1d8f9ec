"""Trunks: the convolutional networks we pretrain and probe.

Every trunk
  * takes RGB images in [0, 1] (it normalises them itself with fixed statistics, so
    datasets, patch streams and methods never disagree on normalisation);
  * has named taps (`conv1`, `conv2`, ...), each the activation *after* the ReLU that
    follows conv -> BatchNorm;
  * `trunk.taps(x, names)` returns {name: activation} and stops at the deepest tap asked;
  * `trunk(x)` returns the penultimate feature vector (B, trunk.feature_dim) that the
    methods' heads sit on;
  * may have a fixed Sobel front-end (greyscale + x/y gradients, as in DeepCluster).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

# Fixed input normalisation (ImageNet statistics, used for every trunk and dataset).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Sobel(nn.Module):
    """Fixed greyscale + Sobel x/y front-end: 3 RGB channels -> 2 gradient channels."""

    grey: torch.Tensor
    kernels: torch.Tensor

    def __init__(self):
        super().__init__()
        grey = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        sx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("grey", grey)
        self.register_buffer("kernels", torch.stack([sx, sx.t()]).unsqueeze(1))

    def forward(self, x: torch.Tensor):
        g = F.conv2d(x, self.grey)
        return F.conv2d(g, self.kernels, padding=1)


def conv_block(cin: int, cout: int, kernel: int, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    padding = kernel // 2 if padding is None else padding
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Trunk(nn.Module):
    """A sequence of named stages; stage `convK` ends with the ReLU of conv K."""

    arch: str = "trunk"
    input_size: int = 32
    config: dict  # the keyword arguments that rebuild it (models.build_trunk)
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, stages: Sequence[tuple[str, nn.Module]], head: nn.Module, feature_dim: int, sobel: bool):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
        self.sobel = Sobel() if sobel else None
        self.stages = nn.ModuleDict(dict(stages))
        self.head = head  # pooling/FC layers after the last conv, up to the feature vector
        self.feature_dim = feature_dim

    @property
    def tap_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    @property
    def conv1(self) -> nn.Conv2d:
        """The first convolution (for filter visualisation)."""
        stage = self.stages["conv1"]
        assert isinstance(stage, nn.Sequential)  # conv -> BatchNorm -> ReLU (a ResNet stem: -> max-pool)
        conv = stage[0]
        assert isinstance(conv, nn.Conv2d)
        return conv

    def _input(self, x: torch.Tensor):
        x = (x - self.mean) / self.std
        return self.sobel(x) if self.sobel is not None else x

    def taps(self, x: torch.Tensor, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        names = list(self.tap_names if names is None else names)
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise KeyError(f"unknown tap(s) {unknown}; {self.arch} has {list(self.tap_names)}")
        last = max(self.tap_names.index(n) for n in names)
        out = {}
        h = self._input(x)
        for i, (name, stage) in enumerate(self.stages.items()):
            h = stage(h)
            if name in names:
                out[name] = h
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor):
        h = self._input(x)
        for stage in self.stages.values():
            h = stage(h)
        return self.head(h)


class CifarTrunk(Trunk):
    """Four conv blocks for 32-px images; see docs/models.md for why this design.

    conv1: `conv1_kernel` x `conv1_kernel` (3 by default: with 5x5 one-image RotNet fell below
    the random trunk at conv1, see docs/models.md), stride 1; a 2x2 max-pool before conv2..conv4;
    3x3 convs after that; global average pool -> widths[3].
    """

    arch = "cifar"
    input_size = 32

    def __init__(self, widths: Sequence[int] = (32, 64, 128, 256), conv1_kernel: int = 3, sobel: bool = False):
        cin = 2 if sobel else 3
        w1, w2, w3, w4 = widths
        stages = [
            ("conv1", conv_block(cin, w1, conv1_kernel)),
            ("conv2", nn.Sequential(nn.MaxPool2d(2), conv_block(w1, w2, 3))),
            ("conv3", nn.Sequential(nn.MaxPool2d(2), conv_block(w2, w3, 3))),
            ("conv4", nn.Sequential(nn.MaxPool2d(2), conv_block(w3, w4, 3))),
        ]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, head, feature_dim=w4, sobel=sobel)
        self.config = {"widths": list(widths), "conv1_kernel": conv1_kernel, "sobel": sobel}


class AlexNet(Trunk):
    """AlexNet with BatchNorm after every conv (PAPER.md §3).

    `big` is DeepCluster's (96-256-384-384-256, FC 9216 -> 4096 -> 4096);
    `small` is RotNet's (64-192-384-256-256). Input 224 px (`input_size`, what probes use); the
    head also takes 112 px (BiGAN's encoder, Donahue et al.): conv5 is adaptively max-pooled to
    6x6, which at 224 px (conv5 13x13) takes exactly the windows of AlexNet's max-pool 3/2, so
    the numbers there are unchanged (tested), and at 112 px (conv5 6x6) passes the map as it is.
    """

    input_size = 224
    WIDTHS = {"big": (96, 256, 384, 384, 256), "small": (64, 192, 384, 256, 256)}

    def __init__(self, size: str = "big", sobel: bool = False, fc_dim: int = 4096):
        cin = 2 if sobel else 3
        c1, c2, c3, c4, c5 = self.WIDTHS[size]
        stages = [
            ("conv1", conv_block(cin, c1, 11, stride=4, padding=2)),
            ("conv2", nn.Sequential(nn.MaxPool2d(3, 2), conv_block(c1, c2, 5, padding=2))),
            ("conv3", nn.Sequential(nn.MaxPool2d(3, 2), conv_block(c2, c3, 3))),
            ("conv4", conv_block(c3, c4, 3)),
            ("conv5", conv_block(c4, c5, 3)),
        ]
        head = nn.Sequential(
            nn.AdaptiveMaxPool2d(6),  # = MaxPool2d(3, 2) on a 13x13 map; no parameters, so checkpoints load as before
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(c5 * 6 * 6, fc_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(fc_dim, fc_dim),
            nn.ReLU(inplace=True),
        )
        super().__init__(stages, head, feature_dim=fc_dim, sobel=sobel)
        self.arch = f"alexnet-{size}"
        self.config = {"size": size, "sobel": sobel, "fc_dim": fc_dim}


@torch.no_grad()
def fuse_batchnorm(trunk: Trunk) -> Trunk:
    """Fold every BatchNorm that directly follows a convolution in a Sequential into that convolution
    (torch's `fuse_conv_bn_eval`), in place, for a frozen trunk in eval mode: the same function up to
    float rounding, one pass less over each activation (feature extraction for the probes: 14% of its
    time went to BatchNorm). Conv and BatchNorm stay where they were (the BatchNorm an Identity), so the
    taps and `conv1` are found as before."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if trunk.training:
        raise ValueError("fuse_batchnorm is for a trunk in eval mode (BatchNorm with running statistics)")
    for module in list(trunk.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats \
                    and not parametrize.is_parametrized(conv):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return trunk


def _init_weights(module: nn.Module) -> None:
    # Kaiming-normal convs, unit BatchNorm: the usual init for ReLU nets. Linears (AlexNet's FC
    # layers) N(0, 0.01) as in DeepCluster's AlexNet: with Kaiming there the 4096-d features are
    # so large (std 2.3) that the first SGD step at lr 0.01 blew RotNet's loss from 1.9 to 17
    # (lr 0.1: 194) and training stalled at chance; with N(0, 0.01) lr 0.01 learns (measured on an
    # H200, alexnet-big, batch 192: loss 1.55 -> 1.20 and 49% rotation accuracy after 60 steps).
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
