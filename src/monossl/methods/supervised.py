"""The supervised baseline: the same trunk plus a linear head, trained with labels.

Standard CIFAR augmentation (pad 4, random crop, horizontal flip) on 32-px data, a
random-resized crop 224 + flip for ImageNet-size data. SGD momentum 0.9, weight decay 5e-4,
step schedule at 50/75% of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from monossl.methods.augment import pad_crop_flip, random_resized_crop
from monossl.methods.base import LinearHeadMethod, RunDefaults, step_lr
from monossl.models.trunks import Trunk


@dataclass
class SupervisedConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_classes: int = 10


class Supervised(LinearHeadMethod):
    name = "supervised"
    Config = SupervisedConfig
    needs = "labelled"
    defaults = RunDefaults(steps=500, batch_size=128, alexnet_lr=0.01)

    def __init__(self, trunk: Trunk, total_steps: int, config: SupervisedConfig | None = None):
        config = config or SupervisedConfig()
        super().__init__(trunk, total_steps, config, config.num_classes)

    def classifier_head(self) -> nn.Linear:
        return self.head

    def lr_at(self, step: int) -> float:
        return step_lr(self.config.lr, step, self.total_steps, milestones=(0.5, 0.75))

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = batch["images"]
        if images.shape[-1] == self.trunk.input_size:
            images = pad_crop_flip(images)
        else:
            images = random_resized_crop(images, self.trunk.input_size, scale=(0.08, 1.0))
        return images, batch["labels"]
