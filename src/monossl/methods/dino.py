"""DINO (Caron et al., 2021): self-distillation with no labels, a student and its momentum teacher.

Each step makes `global_crops` (2) large views and `local_crops` small views of every image (the
stream's patch, then random-resized crop + colour jitter; local crops cover 5-40% of the patch at
half the side, which the convolutional trunk takes as it is). The student (trunk + DINO head: an
MLP to a bottleneck, L2 normalisation, a weight-normalised linear layer to `out_dim` prototypes)
sees every crop, the teacher (an exponential moving average of the student, no gradient) the
global ones; the loss (`losses.dino_loss`) matches the student's softmax to the teacher's centred,
sharpened softmax across different crops. The centre (an EMA of the teacher's mean output, momentum
`center_momentum`) and the teacher's momentum (`teacher_momentum` raised to 1 by a cosine) keep
it from collapsing. The teacher and the centre are a submodule and a buffer: a resumed run is
bit-identical. The teacher's trunk is what the run saves (trunk.pt) and what learning curves probe,
as DINO evaluates it. AdamW is DINO's optimiser; SGD with momentum and a cosine schedule here, as our
other methods on the CIFAR trunk (kept simple; not tuned).

The reference recipe's three stabilisers, each switchable (docs/training.md has the validation runs
behind the defaults):
  * teacher-temperature warm-up: linear from `warmup_teacher_temp` to `teacher_temp` over the first
    `teacher_temp_warmup` of training (off when the two are equal);
  * last-layer freeze: the prototypes' layer takes no step for the first `freeze_last_layer` of training
    (DINO: the first epoch; 0 turns it off);
  * gradient clipping of the student's total norm at `clip_grad` (0: off).
The student runs every crop in one call (`Network.forward` on the list of crops, crops of one size
batched together, as DINO's multi-crop wrapper), so data parallelism sees one forward per step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.distributed import global_rows
from monossl.methods.augment import contrastive_view
from monossl.methods.base import Method, RunDefaults, ema_update
from monossl.methods.losses import dino_loss
from monossl.models.trunks import Trunk


@dataclass
class DINOConfig:
    lr: float = 0.05
    momentum_sgd: float = 0.9
    weight_decay: float = 5e-4
    out_dim: int = 1024
    hidden_dim: int = 512
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04  # the teacher's temperature at step 0 (warm-up off when = teacher_temp)
    teacher_temp_warmup: float = 0.3  # fraction of training over which it rises to teacher_temp
    freeze_last_layer: float = 0.01  # fraction of training in which the last layer takes no step (0: off)
    clip_grad: float = 3.0  # the student's gradient norm is clipped to this (0: off)
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    global_crops: int = 2
    local_crops: int = 4
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    jitter_strength: float = 0.4


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2 normalisation -> weight-normalised linear layer (DINO's projection head)."""

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=1))


class Network(nn.Module):
    """Trunk and head over a list of crops: crops of one size go through the trunk together, the head
    sees every crop's features at once; returns one output per crop, in order."""

    def __init__(self, trunk: Trunk, head: DINOHead):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        features, start = [], 0
        while start < len(crops):
            stop = start
            while stop < len(crops) and crops[stop].shape[-2:] == crops[start].shape[-2:]:
                stop += 1
            features.append(self.trunk(torch.cat(crops[start:stop])))
            start = stop
        return list(self.head(torch.cat(features)).split([len(c) for c in crops]))


class DINO(Method):
    name = "dino"
    Config = DINOConfig
    views = 6  # crops per image with the default config: 2 global + 4 local
    # crops cut out of 48-px patches (not screened for DINO)
    defaults = RunDefaults(steps=1000, batch_size=64, patch_size=48)
    center: torch.Tensor  # a buffer

    def __init__(self, trunk: Trunk, total_steps: int, config: DINOConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config = config or DINOConfig()
        head = DINOHead(trunk.feature_dim, config.hidden_dim, config.bottleneck_dim, config.out_dim)
        self.student = Network(trunk, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self._opt = torch.optim.SGD(self.student.parameters(), lr=config.lr, momentum=config.momentum_sgd,
                                    weight_decay=config.weight_decay)
        self._teacher_out: list[torch.Tensor] = []

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self._opt}

    def published_trunk(self) -> Trunk:
        return self.teacher.trunk  # DINO evaluates the teacher (the student's moving average)

    def crops(self, images: torch.Tensor, n: int, size: int, scale: tuple[float, float]) -> list[torch.Tensor]:
        return [contrastive_view(images, size, scale, self.config.jitter_strength) for _ in range(n)]

    def teacher_momentum(self, step: int) -> float:
        """From `teacher_momentum` at step 0 to 1 at the end (a cosine), as DINO."""
        m = self.config.teacher_momentum
        return 1 - (1 - m) * (math.cos(math.pi * step / max(1, self.total_steps)) + 1) / 2

    def teacher_temp(self, step: int) -> float:
        """Linear from `warmup_teacher_temp` to `teacher_temp` over the warm-up, then constant."""
        cfg = self.config
        warmup = cfg.teacher_temp_warmup * self.total_steps
        if step >= warmup:
            return cfg.teacher_temp
        return cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * step / warmup

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """An EMA of the teacher's mean output over every crop of the whole global batch (every rank)."""
        batch_center = torch.cat([global_rows(t) for t in teacher]).float().mean(0, keepdim=True)
        self.center.mul_(self.config.center_momentum).add_(batch_center, alpha=1 - self.config.center_momentum)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        images = batch["images"]
        size = self.trunk.input_size
        global_views = self.crops(images, cfg.global_crops, size, cfg.global_scale)
        local_views = self.crops(images, cfg.local_crops, size // 2, cfg.local_scale)
        student = self.parallel(self.student)(global_views + local_views)
        with torch.no_grad():
            self._teacher_out = self.teacher(global_views)
        temp = self.teacher_temp(step)
        loss = dino_loss(student, self._teacher_out, self.center, cfg.student_temp, temp)
        return loss, {"teacher_momentum": self.teacher_momentum(step), "teacher_temp": temp}

    def before_update(self, step: int) -> None:
        if step < self.config.freeze_last_layer * self.total_steps:
            for p in self.student.head.last.parameters():
                p.grad = None  # no step (and no weight decay) for the prototypes yet

    def after_update(self, step: int) -> None:
        ema_update(self.teacher, self.student, self.teacher_momentum(step))
        self.update_center(self._teacher_out)
