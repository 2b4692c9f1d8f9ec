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
bit-identical. The teacher's trunk is what the run saves (trunk.pt), as DINO evaluates it. AdamW
is DINO's optimiser; SGD with momentum and a cosine schedule here, as our other methods on the
CIFAR trunk (kept simple; not tuned).
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
from monossl.methods.base import Method, cosine_lr, set_lr
from monossl.methods.losses import dino_loss


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

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=1))


class Network(nn.Module):
    def __init__(self, trunk, head):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, images):
        return self.head(self.trunk(images))


class DINO(Method):
    name = "dino"
    Config = DINOConfig
    views = 6  # crops per image with the default config: 2 global + 4 local

    def __init__(self, trunk, total_steps: int, config: DINOConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config = config or DINOConfig()
        head = DINOHead(trunk.feature_dim, config.hidden_dim, config.bottleneck_dim, config.out_dim)
        self.student = Network(trunk, head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self._opt = torch.optim.SGD(self.student.parameters(), lr=config.lr, momentum=config.momentum_sgd,
                                    weight_decay=config.weight_decay)

    def optimizers(self):
        return {"sgd": self._opt}

    def published_trunk(self):
        return self.teacher.trunk  # DINO evaluates the teacher (the student's moving average)

    def crops(self, images, n: int, size: int, scale) -> list[torch.Tensor]:
        return [contrastive_view(images, size, scale, self.config.jitter_strength) for _ in range(n)]

    def teacher_momentum(self, step: int) -> float:
        """From `teacher_momentum` at step 0 to 1 at the end (a cosine), as DINO."""
        m = self.config.teacher_momentum
        return 1 - (1 - m) * (math.cos(math.pi * step / max(1, self.total_steps)) + 1) / 2

    @torch.no_grad()
    def update_teacher(self, step: int) -> None:
        m = self.teacher_momentum(step)
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
        for t, s in zip(self.teacher.buffers(), self.student.buffers()):
            t.copy_(s)

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """An EMA of the teacher's mean output over every crop of the whole global batch (every rank)."""
        batch_center = torch.cat([global_rows(t) for t in teacher]).float().mean(0, keepdim=True)
        self.center.mul_(self.config.center_momentum).add_(batch_center, alpha=1 - self.config.center_momentum)

    def step(self, batch, step):
        cfg = self.config
        images = batch["images"]
        size = self.trunk.input_size
        global_views = self.crops(images, cfg.global_crops, size, cfg.global_scale)
        local_views = self.crops(images, cfg.local_crops, size // 2, cfg.local_scale)
        student = [self.student(v) for v in global_views + local_views]
        with torch.no_grad():
            teacher = [self.teacher(v) for v in global_views]
        loss = dino_loss(student, teacher, self.center, cfg.student_temp, cfg.teacher_temp)
        lr = cosine_lr(cfg.lr, step, self.total_steps)
        set_lr(self._opt, lr)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step(self._opt)
        self.update_teacher(step)
        self.update_center(teacher)
        return {"loss": loss.item(), "lr": lr, "teacher_momentum": self.teacher_momentum(step)}
