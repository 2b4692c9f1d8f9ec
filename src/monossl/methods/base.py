"""What every method shares: the update step, its optimiser plumbing, defaults and schedules.

A method is an `nn.Module` holding the trunk and its own heads. The training loop calls
`method.step(batch, step)`, which does one full update and returns a dict of floats to log. Most
methods only say what their loss is (`loss(batch, step) -> (loss, logs)`); the default `step` does
the rest in one place: the learning rate of the step on every optimiser, zero/backward, gradient
clipping (`config.clip_grad`), the optimiser steps, and the `before_update`/`after_update` hooks (a
teacher's moving average, a frozen last layer). Mixed precision is the loop's (train.py autocasts
`step`). Learning rates are a pure function of the step index, so resuming from a checkpoint needs no
scheduler state.

Data parallelism: a method runs its trained modules through `self.parallel(...)`, torch's
DistributedDataParallel under torchrun (distributed.data_parallel) and the modules themselves
otherwise; momentum/teacher networks are called directly.

Each method class says how it runs by default (`defaults`: a `RunDefaults`) beside its
hyper-parameters (`Config`, a dataclass): the one place a method's defaults live.

The loop calls every hook of `Method` (begin_epoch, end_epoch, after_step, extra_state,
load_extra_state; pretraining also classifier_head and published_trunk); here they do nothing, and
a method overrides the ones it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.distributed import data_parallel
from monossl.models.trunks import Trunk

if TYPE_CHECKING:  # the data package is imported where a run builds its source
    from monossl.data.batches import Source


@dataclass(frozen=True)
class RunDefaults:
    """How a method runs when the command line does not say: on the CIFAR trunk, sized so that the main
    job fits a 2-core CPU (README); AlexNet keeps the paper's learning rate where it has one."""

    steps: int = 500
    batch_size: int = 64
    patch_size: int = 32  # side of the stream's patches on a small (<= 64 px) trunk; 256 on AlexNet
    num_patches: int | None = None  # a fixed training set: the stream's first N patches (None: unlimited)
    sobel: bool = False  # greyscale gradients in front of the trunk
    alexnet_lr: float | None = None  # the learning rate on AlexNet (None: the Config's)


def step_lr(base_lr: float, step: int, total_steps: int, milestones: tuple[float, ...] = (0.3, 0.6, 0.9),
            gamma: float = 0.1) -> float:
    """lr divided by 1/gamma at each milestone (fractions of training)."""
    drops = sum(step >= m * total_steps for m in milestones)
    return base_lr * gamma**drops


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """lr following half a cosine from base_lr at step 0 to 0 at total_steps."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * step / max(1, total_steps)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100.0


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (MoCo's key
    encoder, DINO's teacher); buffers (BatchNorm statistics) are copied as they are."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for target_buffer, source_buffer in zip(target.buffers(), source.buffers(), strict=True):
        target_buffer.copy_(source_buffer)


class Method(nn.Module):
    name = "method"
    #: what the method needs from its data: "images" (unlabelled) or "labelled"
    needs = "images"
    #: samples the trunk sees per image of a batch (RotNet: 4 rotations; SimCLR: 2 views)
    views = 1
    #: how the method runs when not told otherwise
    defaults: ClassVar[RunDefaults] = RunDefaults()
    #: its hyper-parameters (a dataclass); pretrain fills it from the command line
    Config: ClassVar[type]
    config: Any

    def __init__(self, trunk: Trunk, total_steps: int):
        super().__init__()
        self.trunk = trunk
        self.total_steps = total_steps
        self._parallel: dict[tuple[int, ...], nn.Module] = {}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss (to minimise) and what else to log."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step`: by default a cosine from `config.lr` to 0."""
        return cosine_lr(self.config.lr, step, self.total_steps)

    def step(self, batch: dict, step: int) -> dict[str, float]:
        """One update: lr, loss, zero/backward, clipping, the optimisers' steps; returns what to log."""
        lr = self.lr_at(step)
        optimizers = list(self.optimizers().values())
        for opt in optimizers:
            set_lr(opt, lr)
        loss, logs = self.loss(batch, step)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.before_update(step)
        clip = getattr(self.config, "clip_grad", 0)
        if clip:
            params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
            nn.utils.clip_grad_norm_(params, clip)
        for opt in optimizers:
            opt.step()
        self.after_update(step)
        return {"loss": loss.item(), **logs, "lr": lr}

    def parallel(self, *modules: nn.Module) -> nn.Module:
        """The trained `modules` (applied one after the other) as one module that data parallelism can
        run: DistributedDataParallel under torchrun, made once per set of modules."""
        key = tuple(id(m) for m in modules)
        if key not in self._parallel:
            module = modules[0] if len(modules) == 1 else nn.Sequential(*modules)
            self._parallel[key] = data_parallel(module)
        return self._parallel[key]

    # ----------------------------------------------------------------- hooks (no-ops by default)

    def before_update(self, step: int) -> None:
        """After the backward pass, before clipping and the optimisers' steps (DINO's last-layer freeze)."""

    def after_update(self, step: int) -> None:
        """After the optimisers' steps (a teacher's or key encoder's moving average)."""

    def begin_epoch(self, epoch: int, source: Source) -> dict | None:
        """At every epoch boundary of a finite source: may return {"order": LongTensor of the epoch's
        sample indices (DeepCluster's cluster-uniform sampler), "log": {name: float} for metrics.jsonl}."""
        return None

    def end_epoch(self, epoch: int, run_dir: str | Path) -> None:
        """After an epoch's last step, on rank 0 (e.g. sample grids)."""

    def after_step(self, steps_done: int, run_dir: str | Path) -> None:
        """After every step, on rank 0 (BiGAN's sample grids on an unlimited stream, which has no epochs)."""

    def published_trunk(self) -> Trunk:
        """The trunk a finished run saves as trunk.pt (and learning curves probe): the trained one
        (DINO: its teacher, which DINO evaluates)."""
        return self.trunk

    def classifier_head(self) -> nn.Linear | None:
        """The head that maps the trunk's features to the dataset's class logits, if the method trains
        one (the supervised baseline, a distilled student): saved beside trunk.pt as classifier.pt."""
        return None

    def extra_state(self) -> dict | None:
        """Method state outside parameters and buffers (DeepCluster's pseudo-labels) to keep in checkpoints."""
        return None

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned; called before the weights load (it may rebuild heads)."""

    def training_state(self) -> dict:
        """Everything needed to resume: parameters, buffers, optimiser state, extra state."""
        state = {"model": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()}}
        extra = self.extra_state()
        if extra is not None:
            state["extra"] = extra
        return state

    def load_training_state(self, state: dict) -> None:
        if "extra" in state:
            self.load_extra_state(state["extra"])  # may rebuild heads before their weights load
        self.load_state_dict(state["model"])
        for name, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][name])


class MethodClass(Protocol):
    """A method class as pretraining builds it: `cls(trunk, total_steps, cls.Config(...))`. (Method's own
    constructor takes no config: each method class adds its own, typed.)"""

    name: str
    needs: str
    views: int
    defaults: RunDefaults
    Config: type

    def __call__(self, trunk: Trunk, total_steps: int, config: Any, /) -> Method: ...


class LinearHeadMethod(Method):
    """A trunk plus one linear head trained with cross-entropy and SGD (Nesterov momentum):
    what RotNet (4 rotation classes) and the supervised baseline (the dataset's classes) share.
    The config needs `lr`, `momentum` and `weight_decay`; a subclass says what the inputs and
    targets of a batch are (`inputs`) and what its accuracy is called (`accuracy_name`)."""

    accuracy_name = "acc"

    def __init__(self, trunk: Trunk, total_steps: int, config: Any, num_outputs: int):
        super().__init__(trunk, total_steps)
        self.config = config
        self.head = nn.Linear(trunk.feature_dim, num_outputs)
        self._opt = torch.optim.SGD(self.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self._opt}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))

    def inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (augmented) images of a batch and their class targets."""
        raise NotImplementedError

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = self.inputs(batch)
        logits = self.parallel(self.trunk, self.head)(images)
        return F.cross_entropy(logits.float(), labels), {self.accuracy_name: accuracy(logits, labels)}
