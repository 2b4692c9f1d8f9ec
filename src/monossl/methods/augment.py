"""Batched augmentations the methods add on top of their data (random-resized crop, flip, pad-crop).

Written by hand rather than with torchvision.transforms because those draw per sample
from the global RNG and run one image at a time; here every parameter of a batch is
drawn in one call from the generator we are given (so a step is reproducible from its
seed) and the whole batch is resampled at once on whatever device it lives on.

Under torchrun each rank holds every W-th sample of the global batch: the parameters are
drawn for the whole global batch (the same on every rank) and each rank keeps its rows, so a
sample is augmented the same way whatever the number of processes (monossl/distributed.py).
"""

from __future__ import annotations

import math
from typing import overload

import torch
import torch.nn.functional as F

from monossl.distributed import global_count, global_rows, local_rows


def random_resized_crop(images: torch.Tensor, out_size: int, scale: tuple[float, float] = (0.25, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip_prob: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip for a (B, C, H, W) batch, bilinear, one resampling.

    Area fraction ~ U(scale), log aspect ~ U(log ratio), position uniform where the crop fits
    (crops that do not fit are shrunk to fit: with these ranges that only clips extreme aspects).
    """
    b, _, h, w = images.shape
    n = global_count(b)
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    u_x, u_y, u_flip = (torch.rand(n, generator=generator) for _ in range(3))
    area, log_ratio, u_x, u_y, u_flip = (local_rows(t) for t in (area, log_ratio, u_x, u_y, u_flip))
    aspect = torch.exp(log_ratio)
    # crop width/height as fractions of the image side
    cw = torch.sqrt(area * aspect).clamp(max=1.0)
    ch = torch.sqrt(area / aspect).clamp(max=1.0)
    # centre position in [-1, 1] normalised coordinates so that the crop stays inside
    cx = (u_x * 2 - 1) * (1 - cw)
    cy = (u_y * 2 - 1) * (1 - ch)
    flip = u_flip < flip_prob
    sx = torch.where(flip, -cw, cw)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = cy
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [b, images.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pad_crop_flip(images: torch.Tensor, padding: int = 4, flip_prob: float = 0.5,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation: zero-pad, random crop back to size, horizontal flip."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    n = global_count(b)
    dx = local_rows(torch.randint(0, 2 * padding + 1, (n,), generator=generator))
    dy = local_rows(torch.randint(0, 2 * padding + 1, (n,), generator=generator))
    flip = local_rows(torch.rand(n, generator=generator)) < flip_prob
    # gather crops with one advanced-indexing op instead of a Python loop over the batch
    rows = (dy[:, None] + torch.arange(h)[None]).to(images.device)  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None])  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols).to(images.device)
    bi = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def rotate_four(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image in all four exact rotations (0, 90, 180, 270 degrees counter-clockwise).

    Returns (4B, C, H, W) images ordered [all 0 deg, all 90, all 180, all 270] and labels 0..3.
    """
    rotated = [torch.rot90(images, k, dims=(2, 3)) for k in range(4)]
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return torch.cat(rotated), labels


def colour_jitter(images: torch.Tensor, strength: float = 0.4, hue: float = 0.1, prob: float = 0.8,
                  grey_prob: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """SimCLR's colour distortion for a (B, 3, H, W) batch in [0, 1], as one colour matrix per image.

    With probability `prob`: brightness, saturation and contrast factors uniform in
    [1 - strength, 1 + strength] and a hue turn uniform in [-hue, hue] (the patch stream's
    colour model, `data.patches.colour_matrices`); then greyscale with probability `grey_prob`.
    Batched by hand: torchvision's ColorJitter draws per image from the global RNG.
    """
    from monossl.data.patches import GREY, colour_matrices

    b = images.shape[0]
    n = global_count(b)
    u = local_rows(torch.rand(n, 6, generator=generator, dtype=torch.float64))
    factors = 1 - strength + 2 * strength * u[:, :3]
    turn = (2 * u[:, 3] - 1) * hue
    on, grey = u[:, 4] < prob, u[:, 5] < grey_prob
    ones = torch.ones(b, dtype=torch.float64)
    mats = torch.from_numpy(colour_matrices(torch.where(on, factors[:, 0], ones).numpy(),
                                            torch.where(on, factors[:, 1], ones).numpy(),
                                            torch.where(on, turn, torch.zeros(b, dtype=torch.float64)).numpy()))
    g = torch.tensor(GREY, dtype=torch.float64)
    mats = torch.where(grey[:, None, None], torch.ones(3, 1, dtype=torch.float64) * (g @ mats)[:, None, :], mats)
    contrast = torch.where(on, factors[:, 2], ones)
    mats = mats.to(images.device, images.dtype)
    out = torch.einsum("bij,bjhw->bihw", mats, images)
    # contrast blends with the image's mean grey level, as torchvision's adjust_contrast
    mean_grey = (out * g.to(images.device, images.dtype).view(1, 3, 1, 1)).sum(1).mean((1, 2)).view(b, 1, 1, 1)
    c = contrast.to(images.device, images.dtype).view(b, 1, 1, 1)
    return (c * out + (1 - c) * mean_grey).clamp_(0, 1)


@overload
def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, prob: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@overload
def cutmix(images: torch.Tensor, targets: None = None, alpha: float = 1.0, prob: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, None, torch.Tensor]: ...


def cutmix(images: torch.Tensor, targets: torch.Tensor | None = None, alpha: float = 1.0, prob: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """CutMix (Yun et al., 2019) for a (B, C, H, W) batch: each image gets a box cut from its partner
    (the global batch in reverse order: under torchrun the partner may live on another rank), box area
    ~ 1 - Beta(alpha, alpha), centre uniform, clipped to the image; with probability 1 - prob an image is left whole.

    Returns (mixed images, mixed targets or None, lam): lam (B,) is the fraction of each mixed image
    that is still its own, counted in pixels after clipping, and the targets (B, K) are mixed in the
    same proportion, lam * own + (1 - lam) * partner's. Batched by hand: torchvision's CutMix draws
    from the global RNG and one box per batch."""
    b, _, h, w = images.shape
    n = global_count(b)
    beta = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(alpha)))
    # torch's Beta sampler takes no generator: it draws from the global RNG (seeded at every step)
    lam_drawn = local_rows(beta.sample((n,)))
    u = local_rows(torch.rand(n, 3, generator=generator))
    cut = torch.sqrt(1 - lam_drawn)  # the box's side as a fraction of the image's
    cy, cx = u[:, 0] * h, u[:, 1] * w
    y0 = (cy - cut * h / 2).round().clamp(0, h).long()
    y1 = (cy + cut * h / 2).round().clamp(0, h).long()
    x0 = (cx - cut * w / 2).round().clamp(0, w).long()
    x1 = (cx + cut * w / 2).round().clamp(0, w).long()
    off = u[:, 2] >= prob
    y1 = torch.where(off, y0, y1)
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    box = (((ys >= y0[:, None]) & (ys < y1[:, None]))[:, :, None]
           & ((xs >= x0[:, None]) & (xs < x1[:, None]))[:, None, :])  # (B, H, W)
    lam = 1 - box.flatten(1).float().mean(1)
    box = box[:, None].to(images.device)
    mixed = torch.where(box, _partners(images), images)
    if targets is None:
        return mixed, None, lam
    weight = lam.to(targets.device, targets.dtype)[:, None]
    return mixed, weight * targets + (1 - weight) * _partners(targets), lam


def _partners(rows: torch.Tensor) -> torch.Tensor:
    """Each row's CutMix partner: the global batch reversed, this rank's rows of it (no gradient)."""
    return local_rows(global_rows(rows.detach()).flip(0))


def contrastive_view(images: torch.Tensor, size: int, scale: tuple[float, float] = (0.2, 1.0),
                     jitter_strength: float = 0.4) -> torch.Tensor:
    """SimCLR's view of a batch: random-resized crop to `size` + flip, then colour distortion and greyscale;
    SimCLR, MoCo and DINO's crops all make their views this way."""
    return colour_jitter(random_resized_crop(images, size, scale=scale), strength=jitter_strength)
