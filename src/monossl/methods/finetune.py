"""Fine-tuning with frozen layers (PAPER.md §4, Table 4): the supervised method on a trunk whose
named stages keep their pretrained weights and BatchNorm statistics exactly.

`reinitialised_trunk` builds the starting trunk (a fresh initialisation holding the pretrained
frozen stages); `FineTune` trains it with labels while the frozen stages stay untouched:
`requires_grad=False`, not in the optimiser (so no weight decay and no momentum touch them),
and in eval mode throughout (so their BatchNorm running statistics never move).
"""

from __future__ import annotations

import torch

from monossl.methods.supervised import Supervised, SupervisedConfig
from monossl.models import Trunk, build_trunk


class FineTune(Supervised):
    """The supervised method on a trunk whose `frozen` stages keep their weights and statistics."""

    name = "finetune"

    def __init__(self, trunk: Trunk, total_steps: int, config: SupervisedConfig, frozen: list[str]):
        self.frozen = tuple(frozen)
        for name in self.frozen:
            trunk.stages[name].requires_grad_(False)
        super().__init__(trunk, total_steps, config)
        # Only what trains goes into the optimiser: SGD's weight decay and momentum would otherwise
        # be the only things left that could touch a frozen weight.
        trainable = [p for p in self.parameters() if p.requires_grad]
        self._opt = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)

    def train(self, mode: bool = True):
        # the loop puts the method in training mode; frozen BatchNorm layers stay in eval mode
        # (running statistics used, never updated)
        super().train(mode)
        for name in self.frozen:
            self.trunk.stages[name].eval()
        return self


def reinitialised_trunk(pretrained: Trunk, frozen: list[str], seed: int) -> Trunk:
    """A fresh trunk of the same architecture (its own initialisation, drawn from `seed`) holding
    the pretrained trunk's `frozen` stages: weights and BatchNorm statistics, copied exactly."""
    torch.manual_seed(seed)
    trunk = build_trunk(pretrained.arch, **pretrained.config)
    for name in frozen:
        trunk.stages[name].load_state_dict(pretrained.stages[name].state_dict())
    return trunk
