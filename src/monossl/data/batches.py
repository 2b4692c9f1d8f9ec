"""What the training loop draws at each step: a batch of images (and labels), by index.

A source maps global sample indices to a batch dict. Which indices a step uses is fixed by
the step number and the seed alone, so a resumed run draws exactly what an uninterrupted
one would have, and distributed ranks can split a global batch between them.

  * `StreamSource`: the patch stream. Unlimited (step s uses indices s*B .. s*B+B-1), or
    limited to its first `length` patches, which are then the same patches every epoch.
  * `TensorSource`: an in-memory image set (uint8 N x 3 x H x W), with or without labels.
"""

from __future__ import annotations

import torch


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


class StreamSource:
    def __init__(self, stream, length: int | None = None, seed: int = 0):
        self.stream = stream
        self.length = length
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        return permutation(self.length, self.seed, epoch)

    def fetch(self, indices: torch.Tensor) -> dict:
        return {"images": self.stream.batch(indices.tolist()), "index": indices}

    def describe(self) -> dict:
        return {"kind": "patch-stream", "length": self.length}


class TensorSource:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("TensorSource wants uint8 images of shape (N, C, H, W)")
        self.images = images
        self.labels = labels
        self.length = images.shape[0]
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        return permutation(self.length, self.seed, epoch)

    def fetch(self, indices: torch.Tensor) -> dict:
        batch = {"images": self.images[indices].float().div_(255), "index": indices}
        if self.labels is not None:
            batch["labels"] = self.labels[indices]
        return batch

    def describe(self) -> dict:
        return {"kind": "images", "length": self.length, "labelled": self.labels is not None}
