"""What the training loop draws at each step: a batch of images (and labels), by index.

A source maps global sample indices to a batch dict. Which indices a step uses is fixed by
the step number and the seed alone, so a resumed run draws exactly what an uninterrupted
one would have, and distributed ranks can split a global batch between them.

  * `StreamSource`: the patch stream. Unlimited (step s uses indices s*B .. s*B+B-1), or
    limited to its first `length` patches, which are then the same patches every epoch.
  * `TensorSource`: an in-memory image set (uint8 N x 3 x H x W), with or without labels.
  * `FolderSource`: an ImageFolder tree (`FolderImages`) read image by image, each image
    resized so its short side is S and centre-cropped to S x S; with or without labels.
    Nothing is held in memory, so it scales to ImageNet's 1.28M images.

`dataset_source(dataset, labelled, size, seed)` picks the source for a `monossl.data.datasets` set.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch

from monossl.data.image_sets import FolderImages, LabelledImages, TensorImages
from monossl.data.patches import Stream
from monossl.errors import UserError
from monossl.seeds import derive_seed


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


class Source(Protocol):
    """What the training loop draws from: `StreamSource`, `TensorSource` or `FolderSource`."""

    @property
    def length(self) -> int | None: ...  # None: unlimited

    @property
    def seed(self) -> int: ...

    def order(self, epoch: int) -> torch.Tensor: ...

    def fetch(self, indices: torch.Tensor) -> dict: ...

    def describe(self) -> dict: ...


class StreamSource:
    def __init__(self, stream: Stream, length: int | None = None, seed: int = 0):
        self.stream = stream
        self.length = length
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        assert self.length is not None  # only a finite stream has epochs
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


def load_square(path: str | Path, size: int) -> torch.Tensor:
    """One image file -> uint8 (3, size, size): short side resized to `size` (bilinear, antialiased),
    then the centre crop. Deterministic: the same file always gives the same tensor."""
    from torchvision.transforms.v2 import functional as TF

    from monossl.data.sources import open_rgb

    im = TF.center_crop(TF.resize(open_rgb(path), size, antialias=True), size)
    return TF.pil_to_tensor(im)


class FolderSource:
    """An ImageFolder dataset (anything with `.samples` = [(path, class index)]) as S x S images.

    The methods add their own augmentation (random-resized crop to the trunk's input + flip) on
    top, as they do on the patch stream, so S = 256 for AlexNet (as the paper's patches) and 32
    for the CIFAR trunk. Images are decoded by a few threads (PIL releases the GIL while decoding).
    """

    def __init__(self, dataset: FolderImages, size: int, labelled: bool = False, seed: int = 0,
                 threads: int | None = None):
        if size < 1:
            raise UserError(f"image size must be positive, got {size}")
        self.dataset = dataset
        self.size = size
        self.labelled = labelled
        self.length = len(dataset.samples)
        self.seed = seed
        self.threads = threads or min(8, os.cpu_count() or 1)

    def order(self, epoch: int) -> torch.Tensor:
        return permutation(self.length, self.seed, epoch)

    def fetch(self, indices: torch.Tensor) -> dict:
        samples = [self.dataset.samples[i] for i in indices.tolist()]
        paths = [path for path, _ in samples]
        if self.threads > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(self.threads, len(paths))) as pool:
                images = list(pool.map(load_square, paths, [self.size] * len(paths)))  # keeps the order
        else:
            images = [load_square(p, self.size) for p in paths]
        batch = {"images": torch.stack(images).float().div_(255), "index": indices}
        if self.labelled:
            batch["labels"] = torch.tensor([label for _, label in samples], dtype=torch.long)
        return batch

    def describe(self) -> dict:
        return {"kind": "image-folder", "root": str(self.dataset.root), "length": self.length,
                "labelled": self.labelled, "size": self.size}


def dataset_source(dataset: LabelledImages, labelled: bool, size: int, seed: int = 0) -> TensorSource | FolderSource:
    """The source for a dataset of `monossl.data.datasets`: in-memory sets (CIFAR-10/100, STL-10) as they are,
    ImageFolder trees read from disk at `size` x `size`."""
    if isinstance(dataset, TensorImages):
        return TensorSource(dataset.images, dataset.labels if labelled else None, seed=seed)
    return FolderSource(dataset, size, labelled=labelled, seed=seed)
