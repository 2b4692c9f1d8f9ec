"""Train conv1 in the whitened space of the training data's own patches (`pretrain --whiten-conv1`).

conv1's weight is reparametrised during training as W = U Z, where Z is the ZCA whitening
matrix of the k x k patches (all input channels) of the training source, computed once from its
first few thousand samples, and U is what the optimiser updates. The function class is
unchanged (any W is reachable); what changes is the geometry of SGD on the first layer: a
gradient step on U is a step on W preconditioned by Z Z^T = C^-1, the inverse patch covariance.
Natural images put almost all their variance in smooth, low-frequency directions (a 1/f^2
spectrum), so plain SGD moves conv1 mostly along those and its filters stay blurry; in the
whitened parametrisation every direction learns at the same rate (the classical reason to
whiten before learning first-layer features: Coates & Ng 2011). U starts as the usual Kaiming
initialisation, so training starts from random filters in the whitened space.

The parametrisation uses torch.nn.utils.parametrize and is folded back into a plain conv weight
(`fold`) before the trunk is saved: trunk.pt is an ordinary trunk, probed like any other. Z is
computed from the method's own training data only (the patch stream of one image, or the
dataset's images): no labels and no test data are involved.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from monossl.models.trunks import Trunk


def zca_matrix(patches: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """ZCA whitening matrix (D x D) of `patches` (N x D), computed in float64.

    Eigenvalues are regularised by eps x their mean, so directions with almost no variance are
    amplified by at most about 1/sqrt(eps) relative to the average direction."""
    p = patches.double()
    p = p - p.mean(0)
    cov = p.T @ p / len(p)
    eigenvalues, vectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp_min(0)
    return vectors @ torch.diag((eigenvalues + eps * eigenvalues.mean()).rsqrt()) @ vectors.T


@torch.no_grad()
def random_patches(x: torch.Tensor, kernel_size: int | tuple[int, ...], n_patches: int = 100_000,
                   seed: int = 0) -> torch.Tensor:
    """Up to `n_patches` random kernel_size patches (stride 1, no padding) of `x` (B, C, H, W), as rows
    (N, C * kh * kw) flattened like a conv weight: the rows of `F.unfold(x)` (all B * L patches) picked
    by a random permutation from `seed`, in its order. Gathered directly rather than unfolded, so
    memory is that of the result (all 4096 of a run's 32-px images unfolded are about 1 GB for a
    5 x 5 kernel)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    b, c, h, w = x.shape
    rows, cols = max(h - kh + 1, 0), max(w - kw + 1, 0)  # patch positions per image, unfold's order
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(b * rows * cols, generator=g)[:n_patches].to(x.device)
    image, position = chosen // (rows * cols), chosen % (rows * cols)
    top = (position // cols).view(-1, 1, 1) + torch.arange(kh, device=x.device).view(1, kh, 1)
    left = (position % cols).view(-1, 1, 1) + torch.arange(kw, device=x.device).view(1, 1, kw)
    patches = x[image.view(-1, 1, 1), :, top, left]  # (N, kh, kw, C): the advanced indices' dims come first
    return patches.permute(0, 3, 1, 2).reshape(len(chosen), c * kh * kw)


@torch.no_grad()
def conv1_input_patches(trunk: Trunk, images: torch.Tensor, n_patches: int = 100_000, seed: int = 0) -> torch.Tensor:
    """Up to `n_patches` random k x k patches (N, C_in * k * k) of `images` (B, 3, H, W) in [0, 1] as the
    trunk's conv1 sees them: after its input normalisation and Sobel front-end, if any."""
    x = trunk._input(images.float().to(trunk.mean.device, trunk.mean.dtype))
    return random_patches(x, trunk.conv1.kernel_size, n_patches, seed)


@torch.no_grad()
def conv1_patch_whitening(trunk: Trunk, images: torch.Tensor, n_patches: int = 100_000, seed: int = 0,
                          eps: float = 1e-2) -> torch.Tensor:
    """Z for the trunk's conv1, from `images` (B, 3, H, W) in [0, 1] as the trunk sees them (after its
    input normalisation and Sobel front-end, if any): up to `n_patches` random k x k patches."""
    return zca_matrix(conv1_input_patches(trunk, images, n_patches, seed), eps).float()


class _Whitened(nn.Module):
    """weight = U @ Z, with U the (C_out, C_in * k * k) parameter seen by the optimiser."""

    zca: torch.Tensor  # a buffer

    def __init__(self, zca: torch.Tensor):
        super().__init__()
        self.register_buffer("zca", zca)

    def forward(self, u: torch.Tensor):
        weight = (u.flatten(1) @ self.zca).view_as(u)
        # in U's memory format: a channels-last conv1 weight keeps the trunk channels-last, where an
        # NCHW one would make every later layer convert (a SimCLR step on the CIFAR trunk: 0.228 s against 0.178 s)
        if u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous():
            weight = weight.contiguous(memory_format=torch.channels_last)
        return weight


def whiten(trunk: Trunk, zca: torch.Tensor) -> None:
    """Reparametrise conv1.weight as U Z, U starting at the current weight (random in whitened space)."""
    conv = trunk.conv1
    initial = conv.weight.detach().clone()
    parametrize.register_parametrization(conv, "weight", _Whitened(zca.to(initial)))
    parametrizations = conv.parametrizations
    assert isinstance(parametrizations, nn.ModuleDict)  # what register_parametrization added
    weight = parametrizations["weight"]
    assert isinstance(weight, parametrize.ParametrizationList)
    with torch.no_grad():
        weight.original.copy_(initial)


def is_whitened(trunk: Trunk) -> bool:
    return parametrize.is_parametrized(trunk.conv1, "weight")


def fold(trunk: Trunk) -> None:
    """Replace the parametrisation by the plain weight it gives (U Z): an ordinary trunk again."""
    if is_whitened(trunk):
        parametrize.remove_parametrizations(trunk.conv1, "weight", leave_parametrized=True)
