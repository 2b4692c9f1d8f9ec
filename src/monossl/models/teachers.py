"""Teachers to distil from: a frozen classifier that maps images in [0, 1] to class logits.

Two kinds of `--teacher` spec:

    RUN_DIR                          a finished `monossl pretrain --method supervised` run
                                     (trunk.pt + classifier.pt, models/classifier.py)
    torchvision:ARCH:WEIGHTS[:size=S]
                                     a torchvision classifier (`torchvision.models.get_model(ARCH)`,
                                     e.g. resnet18) with a local state-dict file, as saved by
                                     `torch.save(model.state_dict(), WEIGHTS)`; read with
                                     `weights_only=True`, never downloaded. The number of classes is
                                     read from the weights. Its input is resized to S x S (default
                                     224) and normalised with the ImageNet mean and std, as
                                     torchvision's pretrained classifiers expect.

The teacher is frozen (`requires_grad_(False)`) and kept in eval mode by its user.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.errors import UserError, first_line

if TYPE_CHECKING:
    from monossl.models.classifier import Classifier

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchvisionTeacher(nn.Module):
    """A torchvision classifier behind the resize and normalisation it was trained with."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, model: nn.Module, size: int, num_classes: int):
        super().__init__()
        self.model, self.size, self.num_classes = model, size, num_classes
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor):
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > self.size)
        return self.model((images - self.mean) / self.std)


def _torchvision_teacher(spec: str) -> TorchvisionTeacher:
    import torchvision.models

    from monossl.runs import load_torch

    rest = spec[len(TORCHVISION_PREFIX):]
    arch, sep, path = rest.partition(":")
    size = 224
    if ":size=" in path:
        path, _, text = path.rpartition(":size=")
        if not text.isdigit() or int(text) < 8:
            raise UserError(f"--teacher {spec}: size= wants an integer side of at least 8 pixels, got {text!r}")
        size = int(text)
    if not sep or not arch or not path:
        raise UserError(f"--teacher {spec}: write torchvision:ARCH:WEIGHTS.pth (e.g. torchvision:resnet18:r18.pth)")
    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"--teacher {spec}: {arch!r} is not a torchvision classifier (e.g. resnet18, resnet50)")
    if not Path(path).is_file():
        raise UserError(f"--teacher {spec}: no weights file at {path}")
    state = load_torch(path, "teacher weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--teacher {spec}: {path} is not a state dict of tensors")
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not last:
        raise UserError(f"--teacher {spec}: {path} has no linear classifier weights")
    num_classes = int(last[-1].shape[0])
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"--teacher {spec}: the weights do not fit torchvision's {arch} ({first_line(exc)})") from None
    return TorchvisionTeacher(model, size, num_classes)


def load_teacher(spec: str) -> TorchvisionTeacher | Classifier:
    """The frozen teacher of `spec` (see the module docstring), in eval mode, on the CPU; it has
    `.num_classes`."""
    teacher: TorchvisionTeacher | Classifier
    if str(spec).startswith(TORCHVISION_PREFIX):
        teacher = _torchvision_teacher(str(spec))
    else:
        from monossl.models.classifier import load_classifier

        teacher = load_classifier(spec)[0]
    return teacher.eval().requires_grad_(False)
