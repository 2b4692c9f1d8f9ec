"""RotNet (Gidaris et al., 2018): predict which of four exact rotations an image shows.

Every image of the batch appears in all four rotations in the same batch; 4-way
cross-entropy on a linear head over the trunk's features. SGD with Nesterov momentum
0.9, weight decay 5e-4, lr divided by 10 at 30/60/90% of training (PAPER.md §2).
The method adds its own random-resized crop and horizontal flip before rotating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monossl.methods.augment import random_resized_crop, rotate_four
from monossl.methods.base import LinearHeadMethod, RunDefaults, step_lr
from monossl.models.trunks import Trunk


@dataclass
class RotNetConfig:
    # lr 0.1 and a crop of at least half the patch: on the CIFAR trunk with the default budget these
    # beat lr 0.05 / crop (0.25, 1) at every probed tap over 500 steps (docs/models.md, "Choosing the conv1 kernel")
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_prob: float = 0.5


class RotNet(LinearHeadMethod):
    name = "rotnet"
    Config = RotNetConfig
    views = 4
    # lr 0.01 on AlexNet: the paper's (our CIFAR 0.1 made AlexNet RotNet jump to chance, docs/training.md)
    defaults = RunDefaults(steps=800, batch_size=64, alexnet_lr=0.01)
    accuracy_name = "rotation_acc"

    def __init__(self, trunk: Trunk, total_steps: int, config: RotNetConfig | None = None):
        super().__init__(trunk, total_steps, config or RotNetConfig(), num_outputs=4)

    def lr_at(self, step: int) -> float:
        return step_lr(self.config.lr, step, self.total_steps)

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images = random_resized_crop(batch["images"], self.trunk.input_size, scale=self.config.crop_scale,
                                     flip_prob=self.config.flip_prob)
        return rotate_four(images)
