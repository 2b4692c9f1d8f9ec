"""ResNet-18 trunks with named taps, built from torchvision's own blocks.

Two stems, as used in self-supervised work: `resnet18-cifar` (32-px input: a 3x3 stride-1 conv,
no max-pool, the usual CIFAR variant) and `resnet18` (224-px input: torchvision's 7x7 stride-2
conv and 3x3 max-pool). Taps: `conv1` (after the stem), `layer1` ... `layer4` (after each stage);
features: the global average of layer4 (512). The stages hold torchvision's modules under their
torchvision names, so a trunk's weights map one to one onto `torchvision.models.resnet18`.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

from monossl.models.trunks import Trunk


class ResNet18(Trunk):
    def __init__(self, stem: str = "cifar", sobel: bool = False):
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet-18 stem must be cifar or imagenet, not {stem!r}")
        net = torchvision.models.resnet18(weights=None)
        cin = 2 if sobel else 3
        if stem == "cifar" or sobel:
            kernel, stride = (3, 1) if stem == "cifar" else (7, 2)
            net.conv1 = nn.Conv2d(cin, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
        stem_layers = [net.conv1, net.bn1, net.relu] + ([net.maxpool] if stem == "imagenet" else [])
        stages = [("conv1", nn.Sequential(*stem_layers)), ("layer1", net.layer1), ("layer2", net.layer2),
                  ("layer3", net.layer3), ("layer4", net.layer4)]
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        super().__init__(stages, head, feature_dim=512, sobel=sobel)
        self.arch = "resnet18-cifar" if stem == "cifar" else "resnet18"
        self.input_size = 32 if stem == "cifar" else 224
        self.config = {"stem": stem, "sobel": sobel}


def torchvision_state_dict(trunk: ResNet18) -> dict:
    """The trunk's weights under `torchvision.models.resnet18`'s names (stem conv/bn, layer1..layer4),
    for `load_state_dict(..., strict=False)` into it (its fc layer is not ours). The CIFAR stem's
    3x3 conv only loads into a resnet18 whose conv1 was replaced the same way."""
    stem_names = {"0": "conv1", "1": "bn1"}
    out = {}
    for key, value in trunk.stages.state_dict().items():
        stage, rest = key.split(".", 1)
        if stage == "conv1":
            index, leaf = rest.split(".", 1)
            out[f"{stem_names[index]}.{leaf}"] = value
        else:
            out[key] = value
    return out
