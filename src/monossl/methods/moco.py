"""MoCo v2 (He et al., 2020; Chen et al., 2020): a query encoder, a momentum key encoder and a queue.

Each step: two views of every image (the stream's patch, then random-resized crop + colour jitter,
as SimCLR's); the query encoder (trunk + MLP projector) embeds one, the key encoder (an exponential
moving average of the query encoder, no gradient) the other; InfoNCE (`losses.moco_infonce`) picks
each query's own key among it and the queue's `queue_size` keys of earlier batches; then the key
encoder moves towards the query encoder (momentum `momentum`) and the batch's keys replace the
queue's oldest. The queue, its pointer and the key encoder are buffers and submodules, so they
travel in last.pt and a resumed run is bit-identical. SGD with momentum, cosine schedule.

Under torchrun every rank enqueues the keys of the whole global batch (`distributed.global_rows`),
so the queues stay equal and two processes train as one. MoCo's shuffling BN across GPUs is not
done (`--sync-bn` gives the key encoder global batch statistics instead).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.distributed import global_rows
from monossl.methods.augment import contrastive_view
from monossl.methods.base import Method, RunDefaults, ema_update
from monossl.methods.losses import moco_infonce
from monossl.models.trunks import Trunk


@dataclass
class MoCoConfig:
    lr: float = 0.06
    momentum_sgd: float = 0.9
    weight_decay: float = 5e-4
    temperature: float = 0.2
    momentum: float = 0.99  # of the key encoder
    queue_size: int = 4096
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter_strength: float = 0.4
    projection_dims: tuple[int, int] = (256, 128)  # hidden, output


class Encoder(nn.Module):
    """Trunk and MLP projector: images to unit-length embeddings."""

    def __init__(self, trunk: Trunk, hidden: int, out: int):
        super().__init__()
        self.trunk = trunk
        self.projector = nn.Sequential(nn.Linear(trunk.feature_dim, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.trunk(images)).float(), dim=1)


class MoCo(Method):
    name = "moco"
    Config = MoCoConfig
    views = 2
    # views cut out of 48-px patches, as SimCLR's (not screened for MoCo)
    defaults = RunDefaults(steps=1000, batch_size=128, patch_size=48)
    queue: torch.Tensor  # buffers
    queue_ptr: torch.Tensor

    def __init__(self, trunk: Trunk, total_steps: int, config: MoCoConfig | None = None):
        super().__init__(trunk, total_steps)
        self.config = config = config or MoCoConfig()
        hidden, out = config.projection_dims
        self.query = Encoder(trunk, hidden, out)
        self.key = copy.deepcopy(self.query).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._opt = torch.optim.SGD(self.query.parameters(), lr=config.lr, momentum=config.momentum_sgd,
                                    weight_decay=config.weight_decay)

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"sgd": self._opt}

    def view(self, images: torch.Tensor) -> torch.Tensor:
        return contrastive_view(images, self.trunk.input_size, self.config.crop_scale, self.config.jitter_strength)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """The batch's keys replace the oldest ones (a ring buffer)."""
        n, size = len(keys), len(self.queue)
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        images = batch["images"]
        view_q, view_k = self.view(images), self.view(images)
        q = self.parallel(self.query)(view_q)
        with torch.no_grad():
            ema_update(self.key, self.query, self.config.momentum)  # before the keys, as MoCo
            k = self.key(view_k)
        loss = moco_infonce(q, k, self.queue.clone(), self.config.temperature)
        self.enqueue(global_rows(k))  # the loss holds the queue as it was
        return loss, {}
