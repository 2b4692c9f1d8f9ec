"""RotNet (Gidaris et al., 2018): predict which of four exact rotations an image shows.

Every image of the batch appears in all four rotations in the same batch; 4-way
cross-entropy on a linear head over the trunk's features. SGD with Nesterov momentum
0.9, weight decay 5e-4, lr divided by 10 at 30/60/90% of training (PAPER.md §2).
The method adds its own random-resized crop and horizontal flip before rotating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.methods.augment import random_resized_crop, rotate_four
from monossl.methods.base import Method, accuracy, set_lr, step_lr


@dataclass
class RotNetConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: tuple[float, float] = (0.25, 1.0)
    flip_prob: float = 0.5


class RotNet(Method):
    name = "rotnet"
    Config = RotNetConfig

    def __init__(self, trunk, total_steps: int, config: RotNetConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config or RotNetConfig()
        self.head = nn.Linear(trunk.feature_dim, 4)
        self._opt = torch.optim.SGD(self.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                                    nesterov=True, weight_decay=self.config.weight_decay)

    def optimizers(self):
        return {"sgd": self._opt}

    def forward(self, images):
        return self.head(self.trunk(images))

    def step(self, batch, step):
        images = random_resized_crop(batch["images"], self.trunk.input_size, scale=self.config.crop_scale,
                                     flip_prob=self.config.flip_prob)
        rotated, labels = rotate_four(images)
        lr = step_lr(self.config.lr, step, self.total_steps)
        set_lr(self._opt, lr)
        logits = self(rotated)
        loss = F.cross_entropy(logits.float(), labels)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step(self._opt)
        return {"loss": loss.item(), "rotation_acc": accuracy(logits, labels), "lr": lr}
