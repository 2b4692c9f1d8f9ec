"""Patches of one (or a few) images as a deterministic, batched stream (PAPER.md section 1).

This module turns patch parameters into pixels; the configuration and presets are in
data/patch_config.py, the random parameters in data/patch_params.py.

    stream = PatchStream(load_images(["builtin:astronaut"]), make_config("all", size=32), seed=0)
    x = stream.batch(range(256))          # (256, 3, 32, 32) float32 in [0, 1]
    x0 = stream[0]                        # (3, 32, 32), the same pixels as x[0]
    ds = stream.dataset(1_281_167)        # torch Dataset: item i = (stream[i], i)

What one patch is (the released generator's steps, PAPER.md section 1):

1. initial random square crop, side `initial_crop_fraction` x the image's short side;
2. random-resized crop of that square (area fraction, log-uniform aspect ratio, uniform
   position, retried until it fits), resized to R = floor(sqrt(2) * S);
3. random rotation and x-shear of the R x R image about its centre (black fill);
4. optional horizontal / vertical flip;
5. centre crop S x S;
6. colour jitter with probability `jitter_prob`.

How it is computed here:

* **Deterministic by (seed, index).** Every random number of patch i is a counter-based
  hash (SplitMix64 finaliser) of (seed, i, slot) (data/counter_rng.py); no global RNG state,
  no per-process state. The draw (data/patch_params.py) is vectorised over a batch in numpy float64, so the parameters
  are bit-identical in every process, batch, worker and device. Pixels are bit-identical
  across batch sizes and worker counts on one device (the only reduction, the patch mean
  for contrast, is made exact by summing integers); CPU and CUDA agree to float rounding.
* **One resampling.** Steps 1-5 compose into one affine map from output pixels to source
  pixels, sampled once with `grid_sample`.
* **Antialiased.** Each source image is stored as an image pyramid (data/pyramid.py: two
  levels per octave, each made with Pillow's antialiased bicubic resize) packed into one
  texture; a patch samples (bilinear) the level whose texels are just not larger than its
  output pixels, so a 960 -> 32 shrink matches Pillow's antialiased resize instead of
  aliasing.
* **Fill.** `fill="black"` reproduces the released generator: output pixels whose
  pre-image falls outside the resized crop of step 2 are black (with the 30-degree shear
  about a quarter of the patches have a black wedge). `fill="none"` replaces the R x R
  square of step 2 by the bounding box of the warped output square, so step 2's "fits in
  the crop" test covers everything that is sampled: no fill pixel ever. This truncates
  the area distribution a little (large areas with large rotation+shear are redrawn).
* **Colour jitter in one multiply-add.** brightness (b I), saturation (blend with luma
  grey) and hue (a rotation about the grey axis (1,1,1), an approximation of
  torchvision's HSV hue shift: see `docs/patches.md` for how far apart they are) are one
  3x3 matrix per patch; contrast (blend with the patch's mean grey) becomes a per-patch
  offset. The order is fixed (brightness, saturation, hue, contrast) and values are
  clamped once at the end; torchvision uses a random order and clamps after each step.
  Without intermediate clamping the four operations (nearly) commute, so the order only
  matters through clamping of out-of-range intermediate values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from monossl.data.patch_config import PatchConfig
from monossl.data.patch_params import PatchParams, draw_params, inverse_warp
from monossl.data.pyramid import LEVELS_PER_OCTAVE, Pyramid
from monossl.errors import UserError

# Luma weights of torchvision's rgb_to_grayscale (used by contrast and saturation).
GREY = (0.2989, 0.587, 0.114)


def colour_matrices(brightness: npt.ArrayLike, saturation: npt.ArrayLike, hue: npt.ArrayLike) -> np.ndarray:
    """(B, 3, 3): hue_rotation(hue) @ saturation_blend(s) @ brightness(b), float64.

    Hue is a rotation by 2 pi hue about the grey axis (1, 1, 1)/sqrt(3) (positive turns red
    towards green, as torchvision's HSV hue shift does); saturation blends with the luma
    grey g^T x as torchvision does: s I + (1 - s) 1 g^T.
    """
    b = np.asarray(brightness, dtype=np.float64)
    s = np.asarray(saturation, dtype=np.float64)
    h = np.asarray(hue, dtype=np.float64)
    g = np.array(GREY)
    eye = np.eye(3)
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * np.ones((3, 1)) * g[None, :]
    theta = 2 * np.pi * h
    k = np.ones(3) / math.sqrt(3)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    kk = np.outer(k, k)
    c, sn = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    rot = c * eye + sn * kx + (1 - c) * kk
    return rot @ sat * b[:, None, None]


# ---------------------------------------------------------------------------- the stream

def _as_indices(indices: npt.ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    elif isinstance(indices, range):
        indices = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    arr = np.asarray(indices)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"patch indices must be integers, not {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise IndexError("patch indices must be >= 0")
    return arr


class Stream(Protocol):
    """What a stream of samples offers, whether a `PatchStream` or a per-sample procedural source
    (data/procedural_stream.py ProceduralStream): sample i on demand, in batches, on its device."""

    device: torch.device
    seed: int

    def batch(self, indices: npt.ArrayLike | torch.Tensor) -> torch.Tensor: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...

    def dataset(self, length: int, offset: int = 0) -> PatchDataset: ...


class PatchStream:
    """Patch i of (images, config, seed) on demand, in batches, on any device.

    images: a (3, H, W) tensor, or a list of them (each patch picks its source image
    uniformly, deterministically from (seed, index)), or spec strings for `load_images`.
    names: what to call each image in error messages (its file or built-in name).
    """

    def __init__(self, images: torch.Tensor | Sequence[torch.Tensor] | Sequence[str],
                 config: PatchConfig | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", chunk_pixels: int = 1 << 18, names: Sequence[str] | None = None):
        from monossl.data.sources import load_images

        config = (config or PatchConfig()).validate()
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        images = list(images)
        if images and all(isinstance(x, str) for x in images):
            names = names or list(images)
            images = load_images(images)
        if not images:
            raise UserError("no source image given")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, not {seed!r}")
        self.config = config
        self.seed = int(seed)
        self.device = torch.device(device)
        self.chunk_pixels = int(chunk_pixels)
        need = config.min_short_side()
        self.pyramids = []
        sides = []
        for k, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != 3:
                raise UserError(f"source image {k} must be a (3, H, W) tensor")
            h, w = img.shape[1:]
            if min(h, w) < need:
                name = names[k] if names else f"source image {k}"
                raise UserError(
                    f"{name} is {w}x{h} pixels, too small for patch size {config.size} with "
                    f"initial crop fraction {config.initial_crop_fraction:g}: its short side must be at "
                    f"least {need} pixels"
                )
            # built on the CPU (identical on every device; CUDA's antialiased resize cannot
            # do large reductions), then moved to the stream's device
            pyr = Pyramid(img.detach().to("cpu", torch.float32))
            pyr.texture = pyr.texture.to(self.device)
            self.pyramids.append(pyr)
            sides.append(int(config.initial_crop_fraction * min(h, w)))
        self.num_images = len(self.pyramids)
        self.image_sizes = np.array([(p.width, p.height) for p in self.pyramids], dtype=np.float64)
        self.crop_sides = np.array(sides, dtype=np.float64)
        s = config.size
        centres = torch.arange(s, dtype=torch.float32, device=self.device) + 0.5
        self._u = centres.view(1, 1, s)  # output pixel centres, x
        self._v = centres.view(1, s, 1)  # and y

    # ------------------------------------------------------------------ parameters
    def params(self, indices: npt.ArrayLike | torch.Tensor) -> PatchParams:
        """The sampled parameters of patches `indices` (numpy float64, deterministic)."""
        return draw_params(self.config, self.seed, _as_indices(indices), self.image_sizes, self.crop_sides)

    def output_to_source(self, p: PatchParams):
        """(A, t) with source = A @ output + t, in continuous pixel coordinates (pixel
        centres at k + 0.5), and (Q, q) with pre-warp R-space = Q @ output + q."""
        R = self.config.resize_side
        flip = np.ones((len(p), 2))
        flip[p.hflip, 0] = -1.0
        flip[p.vflip, 1] = -1.0
        Q = inverse_warp(p.angle, p.shear) * flip[:, None, :]  # M^-1 F
        scale = np.stack([p.box_w / R, p.box_h / R], axis=1)
        A = Q * scale[:, :, None]
        # output pixel p sits at p + offset in the R x R image; the offset is torchvision's
        # CenterCrop offset round((R - S) / 2), half a pixel off-centre when R - S is odd
        half = np.full((len(p), 2), R / 2.0 - self.config.crop_offset)
        t = np.stack([p.center_x, p.center_y], axis=1) - np.einsum("bij,bj->bi", A, half)
        q = R / 2.0 - np.einsum("bij,bj->bi", Q, half)
        return A, t, Q, q

    # ------------------------------------------------------------------ pixels
    def level_of_detail(self, p: PatchParams) -> np.ndarray:
        """Pyramid level of each patch before clipping to the image's levels:
        floor(LEVELS_PER_OCTAVE * log2(source pixels per output pixel)), the scale taken
        along the step-2 box axes (where the released generator's antialiased resize is)."""
        R = self.config.resize_side
        s = np.maximum(np.maximum(p.box_w, p.box_h) / R, 1e-12)
        return np.floor(LEVELS_PER_OCTAVE * np.log2(s) + 1e-9).astype(np.int64)

    def render(self, p: PatchParams) -> torch.Tensor:
        """Pixels of the patches described by `p`: (B, 3, S, S) float32 in [0, 1]."""
        S = self.config.size
        n = len(p)
        out = torch.empty(n, 3, S, S, device=self.device)
        if n == 0:
            return out
        step = max(1, self.chunk_pixels // (S * S))
        for start in range(0, n, step):
            stop = min(n, start + step)
            self._render_chunk(p.subset(slice(start, stop)), out[start:stop])
        return out

    def _affine_fill(self, buf: torch.Tensor, coef: np.ndarray) -> torch.Tensor:
        """buf[b, i, j, c] = coef[b, c, 0] * u_j + coef[b, c, 1] * v_i + coef[b, c, 2]
        (u, v: output pixel centres), written without an intermediate (B, S, S, 2) copy."""
        n = coef.shape[0]
        cf = torch.from_numpy(coef.astype(np.float32)).to(self.device)
        for c in range(buf.shape[-1]):
            row = cf[:, c, 0].view(n, 1, 1) * self._u + cf[:, c, 2].view(n, 1, 1)
            col = cf[:, c, 1].view(n, 1, 1) * self._v
            torch.add(row, col, out=buf[..., c])
        return buf

    def _render_chunk(self, p: PatchParams, out: torch.Tensor) -> None:
        cfg = self.config
        S, R = cfg.size, cfg.resize_side
        n = len(p)
        dev = self.device
        A, t, Q, q = self.output_to_source(p)
        lod = self.level_of_detail(p)
        needs_fill = np.zeros(n, dtype=bool)
        if cfg.fill == "black":
            # only patches whose output-square corners leave the R x R square get fill
            corners = np.array([[0.5, 0.5], [S - 0.5, 0.5], [0.5, S - 0.5], [S - 0.5, S - 0.5]])
            pre = np.einsum("bij,cj->bci", Q, corners) + q[:, None, :]
            needs_fill = ((pre < 0) | (pre >= R)).any(axis=(1, 2))
        # work in an order where each (source, fill, jitter) group is one contiguous slice
        order = np.lexsort((p.jitter, needs_fill, p.source))
        identity = bool((order == np.arange(n)).all())
        buf = out if identity else torch.empty(n, 3, S, S, device=dev)
        grid = torch.empty(n, S, S, 2, device=dev)
        src_sorted = p.source[order]
        for k, pyr in enumerate(self.pyramids):
            a, b = np.searchsorted(src_sorted, [k, k + 1])
            if a == b:
                continue
            rows = order[a:b]
            m = b - a
            lv = np.clip(lod[rows], 0, pyr.max_level)
            tab = pyr.table[lv]  # ox, oy, w, h
            sc = tab[:, 2:] / np.array([pyr.width, pyr.height])  # level size / image size
            tex_h, tex_w = pyr.texture.shape[2:]
            # texture coordinate = source * level scale + level offset, normalised to [-1, 1]
            Ak = A[rows] * sc[:, :, None]
            tk = t[rows] * sc + tab[:, :2]
            norm = np.array([2.0 / tex_w, 2.0 / tex_h])
            coef = np.concatenate([Ak, tk[:, :, None]], axis=2) * norm[None, :, None]
            coef[:, :, 2] -= 1.0
            g = self._affine_fill(grid[:m], coef)
            sampled = F.grid_sample(pyr.texture, g.view(1, m * S, S, 2), mode="bilinear",
                                    padding_mode="border", align_corners=False)
            buf[a:b].copy_(sampled.view(3, m, S, S).permute(1, 0, 2, 3))
        if needs_fill.any():
            self._apply_fill(buf, order, needs_fill, Q, q)
        if p.jitter.any():
            self._jitter(buf, order, p)
        if not identity:  # back to the caller's order (index_select is a fast row copy)
            inverse = torch.from_numpy(np.argsort(order)).to(dev)
            torch.index_select(buf, 0, inverse, out=out)

    @staticmethod
    def _runs(flags: np.ndarray):
        """(start, stop) of each run of True in a boolean array."""
        d = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
        return zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0])

    def _apply_fill(self, buf: torch.Tensor, order: np.ndarray, needs_fill: np.ndarray, Q: np.ndarray,
                    q: np.ndarray) -> None:
        """Zero the pixels whose pre-image lies outside the R x R resized crop, as PIL's
        affine transform does (a sample point outside [0, R) is fill)."""
        S, R = self.config.size, self.config.resize_side
        for a, b in self._runs(needs_fill[order]):
            rows = order[a:b]
            coef = np.concatenate([Q[rows], q[rows][:, :, None] - R / 2.0], axis=2)
            pre = self._affine_fill(torch.empty(b - a, S, S, 2, device=self.device), coef)
            # inside iff |x - R/2| <= R/2 and the same for y (boundary: x = R counts as fill)
            half = R / 2.0
            inside = (pre[..., 0] >= -half) & (pre[..., 0] < half) & (pre[..., 1] >= -half) & (pre[..., 1] < half)
            buf[a:b].mul_(inside.unsqueeze(1))

    def _jitter(self, buf: torch.Tensor, order: np.ndarray, p: PatchParams) -> None:
        """Colour jitter as one 3x3 matrix plus offset per patch, clamped once."""
        dev = self.device
        S = self.config.size
        for a, b in self._runs(p.jitter[order]):
            rows = order[a:b]
            m = b - a
            x = buf[a:b]  # (m, 3, S, S)
            mats = colour_matrices(p.brightness[rows], p.saturation[rows], p.hue[rows])
            cf = p.contrast[rows]
            # patch mean colour, summed exactly (integers in float64), so it does not depend
            # on how a reduction is split over threads or batch rows
            qsum = torch.round(x.reshape(m, 3, S * S) * 16777216.0).sum(dim=2, dtype=torch.float64)
            mean = qsum.cpu().numpy() / (16777216.0 * S * S)  # (m, 3)
            grey = np.einsum("c,bcd,bd->b", np.array(GREY), mats, mean)
            lin = mats * cf[:, None, None]
            off = (1.0 - cf) * grey
            coef = torch.from_numpy(np.concatenate([lin.reshape(m, 9), off[:, None]], axis=1)
                                    .T.astype(np.float32).copy()).to(dev)  # (10, m)
            col = [coef[i].view(m, 1, 1) for i in range(10)]
            r, g, bl = x[:, 0].clone(), x[:, 1].clone(), x[:, 2]
            for ch in range(3):
                v = r * col[3 * ch]
                v.add_(g * col[3 * ch + 1])
                v.add_(bl * col[3 * ch + 2])  # channel 2 is overwritten only after its last read
                v.add_(col[9])
                torch.clamp(v, 0.0, 1.0, out=x[:, ch])

    # ------------------------------------------------------------------ public faces
    def batch(self, indices: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        """Patches `indices`: (B, 3, S, S) float32 in [0, 1] on the stream's device."""
        return self.render(self.params(indices))

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, slice):
            if index.stop is None:
                raise IndexError("a patch stream is unbounded: give a slice with a stop")
            return self.batch(range(*index.indices(index.stop)))
        return self.batch([int(index)])[0]

    def dataset(self, length: int, offset: int = 0) -> PatchDataset:
        """A torch Dataset of `length` patches: item i is (stream[offset + i], i)."""
        return PatchDataset(self, length, offset)


class PatchDataset(torch.utils.data.Dataset):
    """`length` patches of a stream for a DataLoader: item i = (stream[offset + i], i).

    Implements `__getitems__`, so a DataLoader (any number of workers) renders each batch
    with one `stream.batch` call. With a CUDA stream use num_workers=0.
    """

    def __init__(self, stream: Stream, length: int, offset: int = 0):
        if length < 0 or offset < 0:
            raise UserError(f"dataset length and offset must be >= 0, not {length} and {offset}")
        self.stream, self.length, self.offset = stream, int(length), int(offset)

    def __len__(self) -> int:
        return self.length

    def _check(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"patch {i} out of range for a dataset of {self.length}")
        return i % self.length if self.length else i

    def __getitem__(self, i: int):
        i = self._check(int(i))
        return self.stream[self.offset + i], i

    def __getitems__(self, indices: Sequence[int]):
        idx = [self._check(int(i)) for i in indices]
        x = self.stream.batch(np.asarray(idx, dtype=np.int64) + self.offset)
        return [(x[j], i) for j, i in enumerate(idx)]
