"""conv1 filters as drawn (PAPER.md section 6): BatchNorm folded in, Sobel trunks composed into
RGB, a measure of spatial structure, and the figure of several networks side by side.

What is drawn:

* each conv1 filter with its **BatchNorm scale folded in**: conv1 has no bias and is followed by
  BatchNorm, so in eval mode `BN(conv(x, W)) = conv(x, W * s) + (beta - running_mean * s)` with
  `s = gamma / sqrt(running_var + eps)` per output channel. `W * s` is what the layer really
  responds with; the shift `beta - running_mean * s` is a constant per channel and not drawn.
* for a trunk with the fixed **Sobel front-end**, the *effective RGB filter*: conv1's
  2-channel kernel (k x k) composed with the two 3x3 Sobel kernels (a (k+2) x (k+2) kernel),
  spread over R, G, B by the greyscale weights. conv1 of a Sobel trunk sees only grey
  gradients, so these filters are grey (drawn in grey).
* each filter min-max normalised on its own (over its three colour channels together, so its
  colours keep their balance), enlarged with nearest-neighbour, tiled in a grid.

Filters act on the trunk's normalised input ((x - mean) / std, std about 0.225 for every
channel); the per-channel std (0.229, 0.224, 0.225) is not folded in: it would change the
colour balance by under 2 %.

Activation patterns (Haufe et al. 2014, "On the interpretation of weight vectors of linear models
in multivariate neuroimaging"): a filter w says how to read a patch, not what it responds to in
data. Its pattern a = C w, C the covariance of the patches it reads, is the patch direction its
response covaries with. A filter trained in whitened coordinates (models/whitening.py, W = U Z)
carries its structure along directions pixels rarely vary in and looks like noise; C undoes Z's
amplification of them, so the pattern shows the structure. Patterns are drawn beside the filters
when a network carries images of its training data (`Network.pattern_images`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid

from monossl.errors import UserError
from monossl.models.trunks import Sobel, Trunk
from monossl.models.whitening import conv1_input_patches, random_patches
from monossl.viz.figures import new_figure, save_figure
from monossl.viz.networks import Network

# ---------------------------------------------------------------------------- filters


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel scale of an eval-mode BatchNorm: gamma / sqrt(running_var + eps)."""
    assert bn.running_var is not None  # eval mode: the layer tracks its statistics
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).detach()


def bn_shift(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel shift of an eval-mode BatchNorm: beta - running_mean * scale."""
    assert bn.running_mean is not None  # eval mode: the layer tracks its statistics
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    return (beta - bn.running_mean * bn_scale(bn)).detach()


def conv1_bn(trunk: Trunk) -> nn.BatchNorm2d | None:
    """The BatchNorm that follows conv1 (None if the trunk has none)."""
    stage = trunk.stages["conv1"]
    for m in list(stage.children())[1:]:
        if isinstance(m, nn.BatchNorm2d):
            return m
        if isinstance(m, nn.Conv2d):
            break
    return None


def sobel_effective(weight: torch.Tensor, sobel: Sobel) -> torch.Tensor:
    """Compose conv1 weights (C, 2, k, k) acting on Sobel gradients with the Sobel front-end.

    The front-end is grey = sum_c g_c x_c (1x1), then two 3x3 cross-correlations K_j; conv1
    then cross-correlates with W[:, j]. Two cross-correlations compose into one whose kernel is
    the full *convolution* of the two: E = sum_j W[:, j] * K_j (size k + 2), which is what
    `conv_transpose2d` computes. Returns (C, 3, k + 2, k + 2): E spread over RGB by g.
    Equal to Sobel + conv1 away from the border (zero padding differs at the border).
    """
    kernels = sobel.kernels.to(weight)  # (2, 1, 3, 3)
    eff = F.conv_transpose2d(weight, kernels)  # (C, 1, k + 2, k + 2), summed over the 2 channels
    grey = sobel.grey.to(weight).view(1, 3, 1, 1)
    return eff * grey


def conv1_filters(trunk: Trunk, fold_bn: bool = True) -> torch.Tensor:
    """conv1's filters as (C, 3, k, k) RGB kernels on the trunk's normalised input.

    fold_bn: multiply each filter by its BatchNorm scale gamma / sqrt(running_var + eps).
    Sobel trunks: the effective RGB filters (C, 3, k + 2, k + 2), see `sobel_effective`.
    """
    weight = trunk.conv1.weight.detach().float().cpu()
    if fold_bn:
        bn = conv1_bn(trunk)
        if bn is not None:
            weight = weight * bn_scale(bn).float().cpu().view(-1, 1, 1, 1)
    sobel = getattr(trunk, "sobel", None)
    if sobel is not None:
        weight = sobel_effective(weight, sobel)
    if weight.shape[1] != 3:
        raise UserError(f"conv1 has {weight.shape[1]} input channels; expected RGB (3) or Sobel (2)")
    return weight


def spatial_coherence(filters: torch.Tensor) -> float:
    """How spatially structured a filter bank is: the uncentred correlation of every weight with its
    right and lower neighbour, over all filters and colour channels,

        sum(a * b) / sqrt(sum(a^2) * sum(b^2))   over adjacent pairs (a, b).

    Independent zero-mean weights (a random initialisation) give about 0 (the sum of products
    cancels); smooth filters (colour blobs, ramps, wide edges) approach 1; checkerboard-like
    high-frequency filters go negative. Each filter is first scaled to unit norm, so strong
    filters do not outweigh weak ones. Undefined for 1x1 filters (returns nan).
    """
    f = filters.detach().double()
    if f.shape[-1] < 2 and f.shape[-2] < 2:
        return float("nan")
    f = f / f.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    pairs = [(f[..., :, :-1], f[..., :, 1:]), (f[..., :-1, :], f[..., 1:, :])]
    dot = sum((a * b).sum() for a, b in pairs)
    norm_a = sum((a * a).sum() for a, _ in pairs)
    norm_b = sum((b * b).sum() for _, b in pairs)
    return float(dot / (norm_a * norm_b).sqrt().clamp_min(1e-300))


def normalise_filters(filters: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each filter to [0, 1] (over its channels together); flat -> 0.5."""
    f = filters.detach().float()
    flat = f.reshape(f.shape[0], -1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    hi = flat.max(1).values.view(-1, 1, 1, 1)
    span = hi - lo
    out = (f - lo) / span.clamp_min(1e-12)
    return torch.where(span > 1e-12, out, torch.full_like(out, 0.5))


def filter_grid(filters: torch.Tensor, scale: int = 4, pad: int = 1, ncols: int | None = None,
                pad_value: float = 1.0, grey: bool = False) -> np.ndarray:
    """Tile filters (C, 3, k, k) into an (H, W, 3) float image in [0, 1].

    Each filter is min-max normalised on its own, enlarged `scale` times (nearest neighbour)
    and tiled by `make_grid` in rows of `ncols` (default ceil(sqrt(C))) cells separated by `pad`
    pixels of `pad_value`. grey=True draws each filter's channel sum in grey (for Sobel trunks).
    H = rows * k * scale + (rows + 1) * pad, W likewise with cols (a single filter: no padding).
    """
    if filters.dim() != 4 or filters.shape[0] == 0:
        raise ValueError(f"filters must be a non-empty (C, channels, k, k) tensor, got {tuple(filters.shape)}")
    f = filters.detach().float().cpu()
    if grey:
        f = f.sum(1, keepdim=True)
    f = normalise_filters(f)
    if scale > 1:
        f = F.interpolate(f, scale_factor=scale, mode="nearest")
    ncols = int(ncols or math.ceil(math.sqrt(f.shape[0])))
    return make_grid(f, nrow=ncols, padding=pad, pad_value=pad_value).permute(1, 2, 0).numpy()


# ---------------------------------------------------------------------------- activation patterns


@torch.no_grad()
def patch_covariance(trunk: Trunk, images: torch.Tensor, n_patches: int = 100_000, seed: int = 0,
                     rgb: bool = False) -> torch.Tensor:
    """Covariance (D x D, float64; centred, divided by N) of up to `n_patches` random k x k patches of
    `images` (B, 3, H, W) in [0, 1] as conv1 sees them (after the input normalisation and the Sobel
    front-end, if any), flattened like conv1's weight: D = C_in * k * k.

    rgb=True: the patches the drawn filters (`conv1_filters`) act on instead: the normalised RGB
    input, (k + 2) x (k + 2) for a Sobel trunk (Sobel front-end + conv1 is one linear filter on
    them); for a trunk without Sobel the same as conv1's."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    kh, kw = trunk.conv1.kernel_size
    if rgb and getattr(trunk, "sobel", None) is not None:
        kh, kw = kh + 2, kw + 2
        x = (images.float().to(trunk.mean) - trunk.mean) / trunk.std
        patches = random_patches(x, (kh, kw), n_patches, seed)
    else:
        patches = conv1_input_patches(trunk, images, n_patches, seed)
    if len(patches) < 2:
        raise UserError(f"{images.shape[0]} image(s) of {images.shape[3]}x{images.shape[2]} px hold fewer than "
                        f"two {kw}x{kh} patches: no patch covariance")
    return torch.cov(patches.double().T, correction=0)


def activation_patterns(filters: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """The activation pattern C w of each filter w (Haufe et al. 2014): filters (N, C, k, k), covariance
    (C*k*k) x (C*k*k) of the patches they read, flattened alike; computed in float64, returned in the
    filters' shape and dtype."""
    flat = filters.detach().flatten(1).double()
    if covariance.shape != (flat.shape[1], flat.shape[1]):
        raise ValueError(f"covariance {tuple(covariance.shape)} does not match filters of {flat.shape[1]} weights")
    return (covariance.double() @ flat.T).T.to(filters.dtype).reshape(filters.shape)


def conv1_patterns(trunk: Trunk, images: torch.Tensor, n_patches: int = 100_000, seed: int = 0) -> torch.Tensor:
    """The activation patterns of `conv1_filters(trunk)` on `images` (same shape): in the space they
    are drawn in, so a Sobel trunk's are RGB (k + 2) x (k + 2) patterns (`patch_covariance(rgb=True)`)."""
    return activation_patterns(conv1_filters(trunk), patch_covariance(trunk, images, n_patches, seed, rgb=True))


def network_patterns(networks: list[Network], n_patches: int = 100_000, seed: int = 0) -> list[torch.Tensor | None]:
    """Each network's `conv1_patterns` on its `pattern_images`; None for a network without them."""
    return [None if n.pattern_images is None else conv1_patterns(n.trunk, n.pattern_images, n_patches, seed)
            for n in networks]


# ---------------------------------------------------------------------------- figure

PAIRS_PER_ROW = 4


def _panels(networks: list[Network], patterns: list, scale: int, ncols: int | None) -> list[tuple[np.ndarray, str]]:
    """(grid, title) of each panel: a network's filters, and its patterns beside them when any network has
    patterns (a network without them then says so)."""
    with_patterns = any(p is not None for p in patterns)
    panels = []
    for n, pattern in zip(networks, patterns):
        f = conv1_filters(n.trunk)
        grey = getattr(n.trunk, "sobel", None) is not None
        coherence = f"spatial coherence {spatial_coherence(f):.2f}"
        if not with_patterns:
            panels.append((filter_grid(f, scale=scale, ncols=ncols, grey=grey), f"{n.label}\n{coherence}"))
        elif pattern is None:
            panels.append((filter_grid(f, scale=scale, ncols=ncols, grey=grey),
                           f"{n.label}: filters\n{coherence}\n(no patterns: no data given)"))
        else:
            on = f" on {n.pattern_data}" if n.pattern_data else ""
            panels.append((filter_grid(f, scale=scale, ncols=ncols, grey=grey), f"{n.label}: filters\n{coherence}"))
            panels.append((filter_grid(pattern, scale=scale, ncols=ncols, grey=grey),
                           f"activation patterns{on}\nspatial coherence {spatial_coherence(pattern):.2f}"))
    return panels


def filters_figure(networks: list[Network], scale: int = 4, ncols: int | None = None, title: str | None = None,
                   patterns: list | None = None):
    """A matplotlib figure: one panel per network, its conv1 grid, titled with its label and spatial coherence.

    Networks with `pattern_images` get a second panel beside their filters: the filters' activation
    patterns on those images, tiled and normalised as the filters. `patterns`: `network_patterns(networks)`
    when already computed (computed here otherwise)."""
    if patterns is None:
        patterns = network_patterns(networks)
    panels = _panels(networks, patterns, scale, ncols)
    # with patterns, at most PAIRS_PER_ROW networks (filters + patterns) side by side, then the next row
    per_row = 2 * PAIRS_PER_ROW if len(panels) > len(networks) else len(panels)
    n_rows = math.ceil(len(panels) / per_row)
    height = max(g.shape[0] for g, _ in panels)
    widths = [max(panels[i][0].shape[1] for i in range(c, len(panels), per_row))
              for c in range(min(per_row, len(panels)))]
    inch = 2.6 / max(height, 1)  # every grid about 2.6 in tall
    fig = new_figure((max(sum(widths) * inch + 0.4 * len(widths), 3), 3.3 * n_rows))
    axes = fig.subplots(n_rows, len(widths), gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, (grid, panel_title) in enumerate(panels):
        ax = axes[i // per_row][i % per_row]
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(panel_title, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_filters(networks: list[Network], out: str | Path, scale: int = 4, ncols: int | None = None,
                  title: str | None = None, patterns: list | None = None) -> Path:
    """Write `filters_figure` (with activation patterns for networks that carry `pattern_images`)."""
    if not networks:
        raise UserError("no network to draw: give RUN directories or --random")
    return save_figure(filters_figure(networks, scale, ncols, title, patterns), out)
