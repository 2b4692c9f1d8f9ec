"""The supervised baseline: the same trunk plus a linear head, trained with labels.

Standard CIFAR augmentation (pad 4, random crop, horizontal flip) on 32-px data, a
random-resized crop 224 + flip for ImageNet-size data. SGD momentum 0.9, weight decay 5e-4,
step schedule at 50/75% of training.
"""

from __future__ import annotations

from dataclasses import dataclass

from monossl.methods.augment import pad_crop_flip, random_resized_crop
from monossl.methods.base import LinearHeadMethod, step_lr


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

    def __init__(self, trunk, total_steps: int, config: SupervisedConfig | None = None):
        config = config or SupervisedConfig()
        super().__init__(trunk, total_steps, config, config.num_classes)

    def classifier_head(self):
        return self.head

    def step(self, batch, step):
        images, labels = batch["images"], batch["labels"]
        if images.shape[-1] == self.trunk.input_size:
            images = pad_crop_flip(images)
        else:
            images = random_resized_crop(images, self.trunk.input_size, scale=(0.08, 1.0))
        lr = step_lr(self.config.lr, step, self.total_steps, milestones=(0.5, 0.75))
        loss, acc = self.classification_step(images, labels, lr)
        return {"loss": loss, "acc": acc, "lr": lr}
