"""SimCLR (Chen et al., 2020) on the trunk: two augmented views of every image, NT-Xent.

Each image of the batch (a patch of the stream, or a dataset image) gives two views, each a
random-resized crop to the trunk's input size with a horizontal flip, SimCLR's colour
distortion and random greyscale (on top of whatever the patch stream already did, so the
stream's augmentation presets keep their meaning). A projection MLP maps the trunk's features
to the embedding the loss sees; the probes use the trunk only. SGD with Nesterov momentum and a
cosine learning rate (a pure function of the step, so resuming needs no scheduler state).

Under torchrun the negatives are the whole global batch: every rank's embeddings are gathered
(`distributed.all_gather_with_grad`, the gradient flowing back to each rank's own rows), so two
processes train the model one process trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from monossl.distributed import all_gather_with_grad, world
from monossl.methods.augment import contrastive_view
from monossl.methods.base import Method, RunDefaults
from monossl.methods.losses import nt_xent
from monossl.models.trunks import Trunk


@dataclass
class SimCLRConfig:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.5
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter_strength: float = 0.4
    projection_dims: tuple[int, int] = (256, 128)  # hidden, output


class SimCLR(Method):
    name = "simclr"
    Config = SimCLRConfig
    views = 2
    # two 32-px views cut out of 48-px patches of the stream
    defaults = RunDefaults(steps=1000, batch_size=128, patch_size=48)

    def __init__(self, trunk: Trunk, total_steps: int, config: SimCLRConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config = config or SimCLRConfig()
        hidden, out = config.projection_dims
        self.projector = nn.Sequential(nn.Linear(trunk.feature_dim, hidden), nn.BatchNorm1d(hidden),
                                       nn.ReLU(inplace=True), nn.Linear(hidden, out))
        self._opt = torch.optim.SGD(self.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self._opt}

    def view(self, images: torch.Tensor) -> torch.Tensor:
        return contrastive_view(images, self.trunk.input_size, self.config.crop_scale, self.config.jitter_strength)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        b = images.shape[0]
        views = torch.cat([self.view(images), self.view(images)])
        z = self.parallel(self.trunk, self.projector)(views)
        z1, z2 = z[:b], z[b:]
        rank = world()[0]
        return nt_xent(z1, z2, self.config.temperature, all_gather_with_grad(z1), all_gather_with_grad(z2),
                       offset=rank * b), {}
