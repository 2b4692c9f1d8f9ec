"""Distillation through patches (Asano & Saeed, ICLR 2023, "The Augmented Image Prior"): a student
trunk and class head, trained from scratch on unlabelled images (patches of one image, a
procedural image, or a dataset's images) with a frozen teacher's softened outputs as the only
signal.

Each step: CutMix on the batch (`augment.cutmix`); the teacher and the student see the same mixed
images ("function matching", Beyer et al. 2022), or, with `teacher_sees="originals"`, the teacher
sees the unmixed images and its outputs are mixed in the boxes' proportions; the loss is
KL(softmax(teacher / T) || softmax(student / T)) T^2 with T = 8 (`losses.distillation_kl`). AdamW,
a linear warm-up over the first 2% of steps, then a cosine decay to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.errors import UserError
from monossl.methods.augment import cutmix
from monossl.methods.base import Method, RunDefaults
from monossl.methods.losses import distillation_kl
from monossl.models.teachers import load_teacher
from monossl.models.trunks import Trunk

TEACHER_SEES = ("mixed", "originals")


@dataclass
class DistillConfig:
    teacher: str = ""  # models.teachers spec: a supervised run directory or torchvision:ARCH:WEIGHTS
    lr: float = 1e-2  # AdamW; screened on a validation split (docs/distillation.md)
    weight_decay: float = 5e-4
    temperature: float = 8.0
    cutmix_alpha: float = 1.0
    cutmix_prob: float = 1.0
    teacher_sees: str = "mixed"
    warmup: float = 0.02  # fraction of the steps


class Distill(Method):
    name = "distill"
    Config = DistillConfig
    defaults = RunDefaults(steps=4000, batch_size=128)

    def __init__(self, trunk: Trunk, total_steps: int, config: DistillConfig):
        super().__init__(trunk, total_steps)
        if config.teacher_sees not in TEACHER_SEES:
            raise UserError(f"--teacher-sees must be one of {', '.join(TEACHER_SEES)}, not {config.teacher_sees!r}")
        if not config.temperature > 0:
            raise UserError(f"--temperature must be positive, got {config.temperature}")
        self.config = config
        # a submodule, so it moves with the method and travels in last.pt (a resumed run keeps its
        # teacher); frozen, and kept in eval mode by `train`
        self.teacher = load_teacher(config.teacher)
        self.head = nn.Linear(trunk.feature_dim, self.teacher.num_classes)
        student = [p for n, p in self.named_parameters() if not n.startswith("teacher.")]
        self._opt = torch.optim.AdamW(student, lr=config.lr, weight_decay=config.weight_decay)

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics of the teacher never change
        return self

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self._opt}

    def classifier_head(self) -> nn.Linear:
        return self.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def lr_at(self, step: int) -> float:
        """A linear warm-up over the first `warmup` of the steps, then a cosine to 0."""
        warmup = max(1, round(self.config.warmup * self.total_steps))
        if step < warmup:
            return self.config.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * self.config.lr * (1 + math.cos(math.pi * progress))

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        images = batch["images"]
        with torch.no_grad():
            if cfg.teacher_sees == "mixed":
                images, _, _ = cutmix(images, alpha=cfg.cutmix_alpha, prob=cfg.cutmix_prob)
                targets = F.softmax(self.teacher(images).float() / cfg.temperature, dim=1)
            else:
                targets = F.softmax(self.teacher(images).float() / cfg.temperature, dim=1)
                images, targets, _ = cutmix(images, targets, alpha=cfg.cutmix_alpha, prob=cfg.cutmix_prob)
        logits = self.parallel(self.trunk, self.head)(images)
        agreement = (logits.argmax(1) == targets.argmax(1)).float().mean().item() * 100
        return distillation_kl(logits, targets, cfg.temperature), {"agreement": agreement}
