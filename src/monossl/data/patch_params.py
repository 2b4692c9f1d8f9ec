"""The random parameters of patches: where each patch comes from, how it is warped, flipped and
colour-jittered, drawn from (config, seed, index) by the counter-based hash of counter_rng.py.

`draw_params` is vectorised over a batch in numpy float64, so the parameters are bit-identical in
every process, batch, worker and device. The random-resized crop of step 2 (data/patches.py) is
retried until it fits, in rounds: the first FIRST_ROUND attempts of every patch at once, more only
for the rare misses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from monossl.data.counter_rng import (
    SLOT_ANGLE,
    SLOT_ATTEMPTS,
    SLOT_BRIGHT,
    SLOT_CONTRAST,
    SLOT_CROP_X,
    SLOT_CROP_Y,
    SLOT_HFLIP,
    SLOT_HUE,
    SLOT_JITTER,
    SLOT_POS_X,
    SLOT_POS_Y,
    SLOT_SAT,
    SLOT_SHEAR,
    SLOT_SOURCE,
    SLOT_VFLIP,
    key_uniforms,
    patch_keys,
)
from monossl.data.patch_config import PatchConfig

FIRST_ROUND = 8  # attempts drawn for every patch at once; more only for the rare misses
MAX_ATTEMPTS = 100  # then the last draw is shrunk until it fits (only degenerate configs)


def inverse_warp(angle_deg: np.ndarray, shear_deg: np.ndarray) -> np.ndarray:
    """(B, 2, 2) map from output offsets to pre-warp offsets: torchvision's inverse affine
    (RandomAffine(angle, shear=(sx, 0)), `_get_inverse_affine_matrix`)."""
    rot = np.deg2rad(angle_deg)
    t = np.tan(np.deg2rad(shear_deg))
    c, s = np.cos(rot), np.sin(rot)
    m = np.empty(angle_deg.shape + (2, 2))
    m[..., 0, 0] = c - s * t
    m[..., 0, 1] = s + c * t
    m[..., 1, 0] = -s
    m[..., 1, 1] = c
    return m


@dataclass
class PatchParams:
    """Everything that defines a batch of patches (numpy arrays, one entry per patch).

    Lengths are in source-image pixels, angles in degrees. `center_x/y` is where the centre
    of the output square lands in the source image; `box_w/h` is the step-2 crop that is
    resized to R x R.
    """

    index: np.ndarray
    source: np.ndarray
    crop_x: np.ndarray
    crop_y: np.ndarray
    crop_side: np.ndarray
    area: np.ndarray
    aspect: np.ndarray
    box_w: np.ndarray
    box_h: np.ndarray
    center_x: np.ndarray
    center_y: np.ndarray
    angle: np.ndarray
    shear: np.ndarray
    hflip: np.ndarray
    vflip: np.ndarray
    jitter: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray
    attempts: np.ndarray
    fitted: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, sel: np.ndarray | slice) -> PatchParams:
        return PatchParams(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})


def draw_params(cfg: PatchConfig, seed: int, idx: np.ndarray, image_sizes: np.ndarray,
                crop_sides: np.ndarray) -> PatchParams:
    """The parameters of patches `idx` (int64 indices) of sources with sizes `image_sizes`
    ((n, 2) width, height) and initial crop sides `crop_sides`: numpy float64, a pure function
    of (cfg, seed, index), whatever else is in the batch."""
    num_images = len(image_sizes)
    n = len(idx)
    keys = patch_keys(seed, idx)
    u = key_uniforms(keys, range(SLOT_ATTEMPTS))
    source = np.minimum((u[:, SLOT_SOURCE] * num_images).astype(np.int64), num_images - 1)
    w_img, h_img = image_sizes[source, 0], image_sizes[source, 1]
    c = crop_sides[source]
    crop_x = u[:, SLOT_CROP_X] * (w_img - c)
    crop_y = u[:, SLOT_CROP_Y] * (h_img - c)
    angle = (2 * u[:, SLOT_ANGLE] - 1) * cfg.rotation_degrees
    shear = (2 * u[:, SLOT_SHEAR] - 1) * cfg.shear_degrees
    hflip = u[:, SLOT_HFLIP] < cfg.hflip_prob
    vflip = u[:, SLOT_VFLIP] < cfg.vflip_prob
    jitter = u[:, SLOT_JITTER] < cfg.jitter_prob

    def factor(slot: int, strength: float):
        lo = max(0.0, 1.0 - strength)
        return np.where(jitter, lo + u[:, slot] * (1.0 + strength - lo), 1.0)

    brightness = factor(SLOT_BRIGHT, cfg.brightness)
    contrast = factor(SLOT_CONTRAST, cfg.contrast)
    saturation = factor(SLOT_SAT, cfg.saturation)
    hue = np.where(jitter, (2 * u[:, SLOT_HUE] - 1) * cfg.hue, 0.0)

    # footprint of the output square per unit box size (fill="none" only):
    # extent of |M^-1 F| (S/2, S/2) in R-space, per axis, relative to R
    R = cfg.resize_side
    if cfg.fill == "none":
        minv = np.abs(inverse_warp(angle, shear))
        reach = 2 * (R / 2.0 - cfg.crop_offset)  # >= S: the off-centre crop reaches further
        foot_x = reach * (minv[:, 0, 0] + minv[:, 0, 1]) / R
        foot_y = reach * (minv[:, 1, 0] + minv[:, 1, 1]) / R
    else:
        foot_x = foot_y = np.ones(n)

    area = np.full(n, np.nan)
    aspect = np.full(n, np.nan)
    attempts = np.zeros(n, dtype=np.int64)
    todo = np.arange(n)
    log_lo, log_hi = math.log(cfg.aspect_range[0]), math.log(cfg.aspect_range[1])
    a_lo, a_hi = cfg.area_range
    k0 = 0
    while len(todo) and k0 < MAX_ATTEMPTS:
        k1 = min(MAX_ATTEMPTS, k0 + (FIRST_ROUND if k0 == 0 else 16))
        slots = SLOT_ATTEMPTS + 2 * np.arange(k0, k1)
        ua = key_uniforms(keys[todo], slots)
        ur = key_uniforms(keys[todo], slots + 1)
        a = a_lo + ua * (a_hi - a_lo) if cfg.scale else np.full_like(ua, cfg.fixed_area)
        r = np.exp(log_lo + ur * (log_hi - log_lo))
        fx = np.sqrt(a * r) * foot_x[todo, None]
        fy = np.sqrt(a / r) * foot_y[todo, None]
        ok = (fx <= 1.0) & (fy <= 1.0)
        hit = ok.any(axis=1)
        first = ok.argmax(axis=1)
        rows = todo[hit]
        area[rows] = a[hit, first[hit]]
        aspect[rows] = r[hit, first[hit]]
        attempts[rows] = k0 + first[hit] + 1
        if k1 >= MAX_ATTEMPTS and not hit.all():  # give up: keep the last draw, shrink below
            miss = todo[~hit]
            area[miss], aspect[miss] = a[~hit, -1], r[~hit, -1]
            attempts[miss] = MAX_ATTEMPTS
        todo = todo[~hit]
        k0 = k1
    box_w = c * np.sqrt(area * aspect)
    box_h = c * np.sqrt(area / aspect)
    fx, fy = box_w * foot_x, box_h * foot_y  # what must fit in the crop
    shrink = np.minimum(1.0, np.minimum(c / fx, c / fy))
    fitted = shrink >= 1.0
    box_w, box_h, fx, fy = box_w * shrink, box_h * shrink, fx * shrink, fy * shrink
    center_x = crop_x + fx / 2 + u[:, SLOT_POS_X] * np.maximum(c - fx, 0.0)
    center_y = crop_y + fy / 2 + u[:, SLOT_POS_Y] * np.maximum(c - fy, 0.0)
    return PatchParams(
        index=idx, source=source, crop_x=crop_x, crop_y=crop_y, crop_side=c,
        area=area, aspect=aspect, box_w=box_w, box_h=box_h, center_x=center_x,
        center_y=center_y, angle=angle, shear=shear, hflip=hflip, vflip=vflip,
        jitter=jitter, brightness=brightness, contrast=contrast, saturation=saturation,
        hue=hue, attempts=attempts, fitted=fitted,
    )
