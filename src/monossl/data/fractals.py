"""Fractal images of iterated function systems (IFS), drawn by the chaos game, a batch at a time.

An IFS is N affine maps w_k(p) = A_k p + t_k of the plane, each used with probability p_k; its
attractor is the one set that is the union of its own images under the maps, and the chaos game
draws it: start on the attractor, apply a map picked at random, mark the point, repeat. The FractalDB
family of pretraining data (Kataoka et al., ACCV 2020) renders such systems with N drawn from 2..8
and p_k proportional to |det A_k|; this module does the same with the sampling rule of Anderson &
Farrell ("Improving Fractal Pre-training", WACV 2022), which makes every system contractive and its
attractor neither a dot nor a blob:

* each linear part is A_k = R(theta_k) diag(s_k1, s_k2) R(phi_k) D_k (rotations by uniform angles, D_k
  a random reflection diag(+-1, +-1)), its singular values 0 <= s_k2 <= s_k1 <= 0.99 (every map a
  contraction, so the attractor exists and the chaos game converges to it);
* the system's sigma-factor sum_k (s_k1 + 2 s_k2) is drawn uniformly from [(5 + N) / 2, (6 + N) / 2],
  the range that paper found to give detailed fractals. Our way of meeting it: the sigma-factor is
  split into the maps' shares c_k = s_k1 + 2 s_k2 uniformly on the simplex (a share above 3 x 0.99
  gives its excess to the other maps in proportion to their room), then s_k1 is uniform in
  [c_k / 3, min(0.99, c_k)] and s_k2 = (c_k - s_k1) / 2 (which keeps s_k2 <= s_k1);
* translations t_k uniform in [-1, 1]^2.

A perturbed system (Nakamura et al., "Scaling Backwards: Minimal Synthetic Pre-training?", ECCV
2024: one fractal, its parameters perturbed per image) adds uniform noise in [-delta, delta] to each
of the 6N parameters; a map the noise made expanding is scaled back to s_k1 = 0.99.

Rendering: P walkers per image start at the fixed point of the most probable map (a map's fixed point
lies on the attractor, so no point is ever off it), take BURN_IN steps to spread out, then mark one
point per step. The points are scaled (one scale for both axes) and centred so that their bounding box fills the
image less a one-pixel margin: every point lands inside by construction. Each map of each image has its own
random colour, bright enough to stand out; a pixel takes the colour of the highest-numbered map with
a point in it (a painter's order by map); pixels with no point are black, FractalDB's background.

Randomness: everything about image i comes from its counter-based key (data/counter_rng.py): the
system's parameters from `system_keys`' slots, the walkers' map choices from the same hash in torch.
Map choice uses 8 random bits per step through a 256-entry table per image (each map at least one
entry, the rest in proportion to |det A_k|), so one 64-bit hash drives 8 steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from monossl.data.counter_rng import (
    counter_offsets,
    key_uniforms,
    torch_bits,
    torch_keys,
)

MIN_MAPS, MAX_MAPS = 2, 8
SIGMA_MAX = 0.99  # the largest singular value any map may have: strictly contractive
BURN_IN = 4  # steps before the first marked point: walkers that started together spread out
MARKED_STEPS = 32  # points marked per walker: more steps and fewer walkers, less work per point
TABLE = 256  # entries of the map-choice table: one byte of a hash per step
MARGIN = 1.0  # pixels between the points' bounding box and the image's border
MIN_EXTENT = 1e-3  # the smallest bounding box drawn, relative to the coordinates' size (pixel_coordinates)

# Slots of a system key (counter_rng.key_uniforms) and of a sample key. Samples and systems may share
# a key (a fresh system per sample), so their slots never overlap; the walkers' counters start above.
SLOT_MAPS, SLOT_SIGMA_FACTOR, SLOT_MAP_BASE, SLOTS_PER_MAP = 100, 101, 110, 8
SLOT_COLOUR_BASE = 10  # sample: map k's colour in slots 10 + 3k .. 12 + 3k
SLOT_PERTURB_BASE = 300  # sample: map k's 6 parameter perturbations in slots 300 + 6k .. 305 + 6k
WALKER_COUNTER_BASE = 1 << 20


@dataclass
class Systems:
    """A batch of IFS: coef[b, k] = (a, b, c, d, e, f) of map k (x' = a x + b y + e, y' = c x + d y + f),
    float64; maps k >= maps[b] are unused (probability 0)."""

    coef: np.ndarray  # (B, MAX_MAPS, 6)
    maps: np.ndarray  # (B,) int

    def __len__(self) -> int:
        return len(self.maps)

    def used(self) -> np.ndarray:
        return np.arange(MAX_MAPS)[None, :] < self.maps[:, None]


def _rotation(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def draw_systems(keys: np.ndarray) -> Systems:
    """One random system per key (uint64 keys of counter_rng.patch_keys), by the rule in the docstring."""
    slots = [SLOT_MAPS, SLOT_SIGMA_FACTOR] + list(range(SLOT_MAP_BASE, SLOT_MAP_BASE + SLOTS_PER_MAP * MAX_MAPS))
    u = key_uniforms(keys, slots)
    n = MIN_MAPS + np.floor(u[:, 0] * (MAX_MAPS - MIN_MAPS + 1)).astype(np.int64)
    factor = (5 + n + u[:, 1]) / 2  # the sigma-factor, uniform in [(5 + N) / 2, (6 + N) / 2]
    per_map = u[:, 2:].reshape(len(keys), MAX_MAPS, SLOTS_PER_MAP)
    used = np.arange(MAX_MAPS)[None, :] < n[:, None]
    # shares uniform on the simplex: the spacings of N - 1 sorted uniforms (the other cuts sit at 1)
    cuts = np.sort(np.where(np.arange(MAX_MAPS)[None, :] < n[:, None] - 1, per_map[:, :, 0], 1.0), axis=1)
    share = np.diff(np.concatenate([np.zeros((len(keys), 1)), cuts], axis=1), axis=1) * factor[:, None]
    share = share * used
    # no map may take more than 3 x SIGMA_MAX: the excess goes to the others in proportion to their room
    # (one pass suffices, since the factor is at most N x 3 x SIGMA_MAX)
    cap = 3 * SIGMA_MAX
    excess = np.maximum(share - cap, 0.0).sum(1, keepdims=True)
    share = np.minimum(share, cap)
    room = (cap - share) * used
    share = share + excess * room / np.maximum(room.sum(1, keepdims=True), 1e-300)
    coef = np.zeros((len(keys), MAX_MAPS, 6))
    for k in range(MAX_MAPS):
        v, c = per_map[:, k], share[:, k]
        s1 = c / 3 + v[:, 1] * (np.minimum(SIGMA_MAX, c) - c / 3)
        s2 = (c - s1) / 2
        reflect = np.stack([np.where(v[:, 4] < 0.5, -1.0, 1.0), np.where(v[:, 5] < 0.5, -1.0, 1.0)], -1)
        linear = _rotation(2 * np.pi * v[:, 2]) * np.stack([s1, s2], -1)[:, None, :]  # R(theta) diag(s)
        linear = linear @ (_rotation(2 * np.pi * v[:, 3]) * reflect[:, None, :])  # ... R(phi) D
        coef[:, k, :4] = linear.reshape(-1, 4)
        coef[:, k, 4:] = 2 * v[:, 6:8] - 1
    coef[np.arange(MAX_MAPS)[None, :] >= n[:, None]] = 0.0
    return Systems(coef, n)


def largest_singular_value(coef: np.ndarray) -> np.ndarray:
    """s_1 of each 2 x 2 linear part (a, b, c, d) in coef[..., :4], in closed form."""
    a, b, c, d = (coef[..., i] for i in range(4))
    frob, det = a * a + b * b + c * c + d * d, a * d - b * c
    return np.sqrt((frob + np.sqrt(np.maximum(frob * frob - 4 * det * det, 0.0))) / 2)


def perturb(systems: Systems, sample_keys: np.ndarray, delta: float) -> Systems:
    """Each used parameter plus uniform noise in [-delta, delta] from the sample's key; maps made
    expanding are scaled back to s_1 = SIGMA_MAX."""
    if delta == 0:
        return systems
    slots = range(SLOT_PERTURB_BASE, SLOT_PERTURB_BASE + 6 * MAX_MAPS)
    noise = (2 * key_uniforms(sample_keys, slots) - 1).reshape(-1, MAX_MAPS, 6) * delta
    coef = systems.coef + noise * systems.used()[:, :, None]
    s1 = largest_singular_value(coef)
    coef[..., :4] *= np.minimum(1.0, SIGMA_MAX / np.maximum(s1, 1e-12))[..., None]
    return Systems(coef, systems.maps)


def choice_tables(systems: Systems) -> np.ndarray:
    """(B, TABLE) map indices: map k fills a share of the table proportional to |det A_k|, at least one
    entry per used map (largest remainders first, so the shares sum to TABLE exactly)."""
    c = systems.coef
    det = np.abs(c[..., 0] * c[..., 3] - c[..., 1] * c[..., 2]) * systems.used()
    spare = TABLE - systems.maps  # entries left after each used map's one
    share = det / np.maximum(det.sum(1, keepdims=True), 1e-300) * spare[:, None]
    counts = np.floor(share).astype(np.int64)
    short = spare - counts.sum(1)  # handed out by largest remainder
    rank = np.argsort(np.argsort(2.0 * ~systems.used() - (share - counts), axis=1, kind="stable"), axis=1)
    counts += (rank < short[:, None]).astype(np.int64) + systems.used()
    # every row's counts sum to TABLE, so repeating each map index by its count gives the rows in turn
    return np.repeat(np.tile(np.arange(MAX_MAPS), len(counts)), counts.reshape(-1)).reshape(-1, TABLE)


def fixed_points(coef: np.ndarray) -> np.ndarray:
    """(B, K, 2): the fixed point (I - A)^-1 t of each map (on the attractor; A is a contraction)."""
    a, b, c, d, e, f = (coef[..., i] for i in range(6))
    det = (1 - a) * (1 - d) - b * c
    return np.stack([((1 - d) * e + b * f) / det, (c * e + (1 - a) * f) / det], -1)


def map_colours(sample_keys: np.ndarray) -> np.ndarray:
    """(B, MAX_MAPS, 3) colours in [0.25, 1]: bright enough to stand out from the black background."""
    u = key_uniforms(sample_keys, range(SLOT_COLOUR_BASE, SLOT_COLOUR_BASE + 3 * MAX_MAPS))
    return (0.25 + 0.75 * u).reshape(-1, MAX_MAPS, 3)


def walker_count(size: int, density: float) -> int:
    """Walkers per image for `density` points per pixel on average."""
    return max(1, math.ceil(density * size * size / MARKED_STEPS))


def chaos_game(systems: Systems, sample_keys: np.ndarray, walkers: int,
               device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """The marked points: x, y (float32) and the map that made each (global index b * MAX_MAPS + k),
    each (MARKED_STEPS, B, walkers)."""
    n = len(systems)
    dev = torch.device(device)
    tables = torch.from_numpy((choice_tables(systems) + (np.arange(n) * MAX_MAPS)[:, None]).reshape(-1)
                              .astype(np.int32)).to(dev)
    # one row per coefficient, B * MAX_MAPS long: small enough to stay in cache for the gathers
    coef = torch.from_numpy(systems.coef.reshape(-1, 6).T.astype(np.float32).copy()).to(dev)
    table_rows = (torch.arange(n, device=dev) * TABLE).view(n, 1)
    # every walker starts at the fixed point of the most probable map: on the attractor, where its
    # measure is (a rare map's fixed point can sit far out, and the bounding box would follow it)
    m = systems.coef
    first_map = np.argmax(np.abs(m[..., 0] * m[..., 3] - m[..., 1] * m[..., 2]) * systems.used(), axis=1)
    start = fixed_points(m)[np.arange(n), first_map].astype(np.float32)  # (B, 2)
    x = torch.from_numpy(start[:, :1]).to(dev).expand(n, walkers).contiguous()
    y = torch.from_numpy(np.ascontiguousarray(start[:, 1:])).to(dev).expand(n, walkers).contiguous()
    keys = torch_keys(sample_keys, dev).view(n, 1)
    walker_ids = torch.arange(walkers, device=dev, dtype=torch.int64)
    xs = torch.empty(MARKED_STEPS, n, walkers, device=dev)
    ys = torch.empty_like(xs)
    maps = torch.empty(MARKED_STEPS, n, walkers, device=dev, dtype=torch.int32)  # half the memory traffic
    bits = torch.empty(0, dtype=torch.int64, device=dev)  # drawn at step 0
    for step in range(BURN_IN + MARKED_STEPS):
        if step % 8 == 0:  # one hash per walker drives the next 8 steps, a byte each
            group = WALKER_COUNTER_BASE + walkers * (step // 8)
            bits = torch_bits(keys, counter_offsets(walker_ids + group))
        entry = (table_rows + ((bits >> (8 * (step % 8))) & (TABLE - 1))).view(-1)
        marked = step - BURN_IN
        # index_select, not tensor[index]: several times faster on small gathers
        g = torch.index_select(tables, 0, entry, out=maps[marked].view(-1) if marked >= 0 else None)
        a, b, c, d, e, f = (torch.index_select(coef[i], 0, g).view(n, walkers) for i in range(6))
        x_out = xs[marked] if marked >= 0 else None
        y_out = ys[marked] if marked >= 0 else None
        new_x = torch.addcmul(e, a, x, out=x_out).addcmul_(b, y)  # a x + b y + e
        y = torch.addcmul(f, c, x, out=y_out).addcmul_(d, y)  # c x + d y + f
        x = new_x
    return xs, ys, maps


def pixel_coordinates(xs: torch.Tensor, ys: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and row (int64) of each point of (steps, B, walkers) tensors: one scale for both axes, the
    points' bounding box centred and filling the image less MARGIN pixels on each side, so every
    coordinate is in [MARGIN, size - MARGIN] before rounding down (and truncation is rounding down).
    A box smaller than MIN_EXTENT (all walkers still at their start point) is drawn as a dot in the middle."""
    lo_x, hi_x = xs.amin(dim=(0, 2)), xs.amax(dim=(0, 2))
    lo_y, hi_y = ys.amin(dim=(0, 2)), ys.amax(dim=(0, 2))
    # the box is at least MIN_EXTENT of the coordinates' size: float32 rounding of p * scale is then
    # well under a pixel (under MARGIN). Without it, walkers that never left their start (a rare map never
    # drawn) gave a box of a few ulps, a scale near 1e13 and points far outside the image.
    magnitude = torch.stack([lo_x.abs(), hi_x.abs(), lo_y.abs(), hi_y.abs()]).amax(0)
    extent = torch.maximum(torch.maximum(hi_x - lo_x, hi_y - lo_y), MIN_EXTENT * (1 + magnitude))
    scale = (size - 2 * MARGIN) / extent
    # p -> (p - centre) * scale + size / 2, as one multiply-add
    shift_x, shift_y = size / 2 - (lo_x + hi_x) / 2 * scale, size / 2 - (lo_y + hi_y) / 2 * scale
    col = torch.addcmul(shift_x.view(-1, 1), xs, scale.view(-1, 1)).long()
    row = torch.addcmul(shift_y.view(-1, 1), ys, scale.view(-1, 1)).long()
    return col, row


def splat(col: torch.Tensor, row: torch.Tensor, maps: torch.Tensor, colours: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, S, S) images of the points col, row, maps ((steps, B, walkers), as `chaos_game` gives them):
    each pixel the colour of the highest-numbered map with a point in it (a
    painter's order by map; black if no point). colours: (B * MAX_MAPS, 3). A maximum of integers, so
    the pixels do not depend on the order points are added in, on any device."""
    n = colours.shape[0] // MAX_MAPS
    first_bin = torch.arange(n, device=maps.device).view(1, n, 1) * (size * size)  # the sample's image
    bins = (row * size).add_(col).add_(first_bin).reshape(-1)
    top = torch.full((n * size * size,), -1, dtype=maps.dtype, device=maps.device)
    top.scatter_reduce_(0, bins, maps.reshape(-1), "amax")
    palette = torch.cat([colours.new_zeros(1, 3), colours])  # row 0: the background
    image = torch.index_select(palette, 0, top + 1)  # (B * S * S, 3)
    return image.view(n, size * size, 3).transpose(1, 2).reshape(n, 3, size, size)


def render(systems: Systems, sample_keys: np.ndarray, size: int, density: float,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """The images (B, 3, size, size) float32 in [0, 1] of `systems`, one per sample key."""
    if len(systems) == 0:
        return torch.empty(0, 3, size, size, device=device)
    xs, ys, maps = chaos_game(systems, sample_keys, walker_count(size, density), device)
    col, row = pixel_coordinates(xs, ys, size)
    colours = torch.from_numpy(map_colours(sample_keys).astype(np.float32)).to(xs.device)
    return splat(col, row, maps, colours.view(-1, 3), size)
