"""What every method shares: the optimiser plumbing and the step learning-rate schedule.

A method is an `nn.Module` holding the trunk and its own heads. The training loop calls
`method.step(batch, step)`, which does one full update (forward, backward, optimiser
steps) and returns a dict of floats to log. Methods step their optimisers through
`self.optimizer_step(opt)`, which averages gradients over ranks under torchrun, so data
parallelism works for every method and every optimiser, including ones made mid-run.
Learning rates are a pure function of the step index, so resuming from a checkpoint
needs no scheduler state.

The loop calls every hook of `Method` (begin_epoch, end_epoch, after_step, extra_state,
load_extra_state; pretraining also classifier_head); here they do nothing, and a method
overrides the ones it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.distributed import average_gradients


def step_lr(base_lr: float, step: int, total_steps: int, milestones=(0.3, 0.6, 0.9), gamma: float = 0.1) -> float:
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


class Method(nn.Module):
    name = "method"
    #: what the method needs from its data: "images" (unlabelled) or "labelled"
    needs = "images"
    #: samples the trunk sees per image of a batch (RotNet: 4 rotations; SimCLR: 2 views)
    views = 1

    def __init__(self, trunk: nn.Module, total_steps: int):
        super().__init__()
        self.trunk = trunk
        self.total_steps = total_steps

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def step(self, batch: dict, step: int) -> dict[str, float]:
        raise NotImplementedError

    # ----------------------------------------------------------------- hooks (no-ops by default)

    def begin_epoch(self, epoch: int, source) -> dict | None:
        """At every epoch boundary of a finite source: may return {"order": LongTensor of the epoch's
        sample indices (DeepCluster's cluster-uniform sampler), "log": {name: float} for metrics.jsonl}."""
        return None

    def end_epoch(self, epoch: int, run_dir) -> None:
        """After an epoch's last step, on rank 0 (e.g. sample grids)."""

    def after_step(self, steps_done: int, run_dir) -> None:
        """After every step, on rank 0 (BiGAN's sample grids on an unlimited stream, which has no epochs)."""

    def published_trunk(self) -> nn.Module:
        """The trunk a finished run saves as trunk.pt: the trained one (DINO: its teacher, which DINO
        evaluates)."""
        return self.trunk

    def classifier_head(self) -> nn.Module | None:
        """The head that maps the trunk's features to the dataset's class logits, if the method trains
        one (the supervised baseline, a distilled student): saved beside trunk.pt as classifier.pt."""
        return None

    def extra_state(self) -> dict | None:
        """Method state outside parameters and buffers (DeepCluster's pseudo-labels) to keep in checkpoints."""
        return None

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned; called before the weights load (it may rebuild heads)."""

    @staticmethod
    def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.step()`, after averaging gradients over ranks when running distributed."""
        average_gradients(p for group in optimizer.param_groups for p in group["params"])
        optimizer.step()

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


class LinearHeadMethod(Method):
    """A trunk plus one linear head trained with cross-entropy and SGD (Nesterov momentum):
    what RotNet (4 rotation classes) and the supervised baseline (the dataset's classes) share.
    The config needs `lr`, `momentum` and `weight_decay`."""

    def __init__(self, trunk, total_steps: int, config, num_outputs: int):
        super().__init__(trunk, total_steps)
        self.config = config
        self.head = nn.Linear(trunk.feature_dim, num_outputs)
        self._opt = torch.optim.SGD(self.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)

    def optimizers(self):
        return {"sgd": self._opt}

    def forward(self, images):
        return self.head(self.trunk(images))

    def classification_step(self, images, labels, lr: float) -> tuple[float, float]:
        """One SGD step on cross-entropy at learning rate `lr`; returns (loss, accuracy %)."""
        set_lr(self._opt, lr)
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        self._opt.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer_step(self._opt)
        return loss.item(), accuracy(logits, labels)
