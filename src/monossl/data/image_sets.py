"""The two labelled-image dataset types every loader returns, with one interface.

`TensorImages`: a whole split in memory, `.images` uint8 (N, 3, H, W), `.labels` int64 (N,),
`.classes` (names), `.source` (where it was read); its item is `(float image (3, H, W) in [0, 1],
label)`, or `(transform(uint8 image), label)` when a transform is set. `FolderImages`: a torchvision
`ImageFolder` with `.labels`, `.classes` and `.source` as well; its default transform gives the float
tensor of the whole image. Both have `with_transform(t)` (a shallow copy with another transform)
and `restricted(indices)` (a copy holding only those items); `TensorImages.resized(side)` is a copy
at another image size (antialiased, uint8), e.g. to probe a 32-px trunk on STL-10's 96-px images.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as TF

from monossl.errors import UserError

Transform = Callable[..., torch.Tensor]  # an image (PIL or uint8 tensor) -> the tensor an item holds


class TensorImages(Dataset):
    """A labelled image set held in memory as one uint8 tensor (N, 3, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], source: str = "",
                 transform: Transform | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{source or 'images'}: expected uint8 images (N, 3, H, W), got "
                            f"{str(images.dtype).replace('torch.', '')} {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{source or 'labels'}: expected {len(images)} labels, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.source = source
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i]
        img = self.transform(img) if self.transform is not None else img.float().div_(255)
        return img, int(self.labels[i])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def with_transform(self, transform: Transform | None) -> TensorImages:
        out = copy.copy(self)
        out.transform = transform
        return out

    def restricted(self, indices: Sequence[int] | torch.Tensor) -> TensorImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx], self.classes, self.source, self.transform)

    def resized(self, side: int) -> TensorImages:
        """A copy with every image resized to side x side (uint8 kept; labels, classes, transform
        the same; `.source` says so), e.g. STL-10's 96 px for a trunk that takes 32 px."""
        if side <= 0:
            raise UserError(f"{self.source or 'images'}: cannot resize to {side} px")
        if tuple(self.images.shape[-2:]) == (side, side):
            return self
        # antialias: shrinking 96 -> 32 without it reads a few pixels per output pixel and aliases
        # fine texture into noise; with it each output averages its whole footprint, as a photo
        # taken at that size would. torchvision resizes uint8 natively on CPU (bilinear), so the
        # images stay uint8 without a float copy of the split; chunks bound the temporaries.
        images = torch.cat([TF.resize(chunk, [side, side], interpolation=TF.InterpolationMode.BILINEAR,
                                      antialias=True) for chunk in self.images.split(1024)])
        return TensorImages(images, self.labels, self.classes, f"{self.source} (resized to {side}x{side})",
                            self.transform)

    def __repr__(self):
        return (f"TensorImages({len(self)} images {tuple(self.images.shape[1:])}, "
                f"{len(self.classes)} classes, {self.source})")


class _ToFloat:
    """PIL image -> float tensor (3, H, W) in [0, 1] (the default FolderImages transform)."""

    def __call__(self, img: Image.Image):
        return TF.to_dtype(TF.to_image(img), torch.float32, scale=True)


class FolderImages(ImageFolder):
    """A torchvision ImageFolder (root/<class>/<image>) with the monossl dataset interface."""

    def __init__(self, root: str | Path, source: str = "", transform: Transform | None = None):
        from monossl.data.sources import open_rgb

        # open_rgb: a file Pillow cannot read is a one-line error naming it, not PIL's traceback
        super().__init__(str(root), transform=transform if transform is not None else _ToFloat(), loader=open_rgb)
        self.source = source or str(root)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.targets, dtype=torch.long)

    def with_transform(self, transform: Transform | None) -> FolderImages:
        out = copy.copy(self)
        out.transform = transform
        return out

    def restricted(self, indices: Sequence[int] | torch.Tensor) -> FolderImages:
        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in indices]
        out.imgs = out.samples
        out.targets = [s[1] for s in out.samples]
        return out

    def __repr__(self):
        return f"FolderImages({len(self)} images, {len(self.classes)} classes, {self.source})"


LabelledImages = TensorImages | FolderImages  # what every dataset loader returns
