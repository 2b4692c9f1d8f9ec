"""Procedural source images with no natural content, usable everywhere an image is.

    procedural:dead-leaves[:key=value...]   discs of random colour and size occluding one another
    procedural:noise[:key=value...]         every pixel's colour uniform in [0, 1] (a lower bound)

These two are one image each, which the patch stream crops like a photograph. The per-sample sources
`procedural:fractal` and `procedural:spectral` (a new image for every sample, data/procedural_stream.py)
are named here too, so that every `procedural:` spec is checked in one place.

Dead leaves (Matheron 1968; Lee, Mumford & Huang 2001; the synthetic pretraining data of Baradad
et al. 2021): discs fall one after the other and a later disc lies *under* the earlier ones, so
each pixel shows the first disc that covered it. Radii follow p(r) ~ r^-alpha on [rmin, rmax]
(alpha = 3 gives the scale invariance of natural images), centres are uniform over the canvas
and colours uniform in RGB; discs fall until every pixel is covered (at most `discs` of them; a
pixel never covered keeps a random background colour).

Keys (all optional, `procedural:dead-leaves:size=256:seed=3`): size (side in pixels, default
512), seed (default 0); dead leaves also rmin (default 2), rmax (default size / 4), alpha
(default 3), discs (default 100000). The image is a pure function of its spec: the same spec
gives the same pixels on every machine (numpy's PCG64 seeded by `seed`).
"""

from __future__ import annotations

import numpy as np
import torch

from monossl.errors import UserError

PROCEDURAL_PREFIX = "procedural:"
KINDS = ("dead-leaves", "noise")
PER_SAMPLE_KINDS = ("fractal", "spectral")  # data/procedural_stream.py renders these
_KEYS: dict[str, dict[str, type[int] | type[float]]] = {
    "dead-leaves": {"size": int, "seed": int, "rmin": float, "rmax": float, "alpha": float, "discs": int},
    "noise": {"size": int, "seed": int},
}


def kind_of(spec: object) -> str | None:
    """'procedural:fractal:100' -> 'fractal'; None for a spec that is not procedural."""
    spec = str(spec)
    return spec[len(PROCEDURAL_PREFIX):].split(":")[0] if spec.startswith(PROCEDURAL_PREFIX) else None


def is_per_sample(spec: object) -> bool:
    """Whether `spec` is a source with a new image per sample (no one image to crop)."""
    return kind_of(spec) in PER_SAMPLE_KINDS


def unknown_kind(kind: str, spec: str) -> UserError:
    return UserError(f"unknown procedural image {kind!r} in {spec!r}; choose from "
                     f"{', '.join(KINDS)} (one image each) or {', '.join(PER_SAMPLE_KINDS)} (a new image per sample)")


def parse(spec: str) -> tuple[str, dict]:
    """'procedural:dead-leaves:size=256:seed=3' -> ('dead-leaves', {...every key resolved...})."""
    kind, *items = spec[len(PROCEDURAL_PREFIX):].split(":")
    if kind in PER_SAMPLE_KINDS:
        raise UserError(f"{spec} draws a new image for every sample: it is a training source (--image of "
                        "pretrain, distill, generate, compare, reproduce), not one image")
    if kind not in KINDS:
        raise unknown_kind(kind, spec)
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in _KEYS[kind]:
            raise UserError(f"{spec}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_KEYS[kind])}")
        try:
            params[key] = _KEYS[kind][key](text)
        except ValueError:
            raise UserError(f"{spec}: {key} wants a number, got {text!r}") from None
    size = params.setdefault("size", 512)
    params.setdefault("seed", 0)
    if not 8 <= size <= 8192:
        raise UserError(f"{spec}: size must be 8..8192 pixels, got {size}")
    if params["seed"] < 0:
        raise UserError(f"{spec}: seed must be >= 0, got {params['seed']}")
    if kind == "dead-leaves":
        params.setdefault("rmin", 2.0)
        params.setdefault("rmax", size / 4)
        params.setdefault("alpha", 3.0)
        params.setdefault("discs", 100_000)
        if not 0 < params["rmin"] <= params["rmax"]:
            raise UserError(f"{spec}: wants 0 < rmin <= rmax, got rmin={params['rmin']:g}, rmax={params['rmax']:g}")
        if params["discs"] < 1 or params["alpha"] <= 0:
            raise UserError(f"{spec}: discs must be >= 1 and alpha > 0")
    return kind, params


def _radii(rng: np.random.Generator, n: int, rmin: float, rmax: float, alpha: float) -> np.ndarray:
    """n radii with density ~ r^-alpha on [rmin, rmax], by inverting the CDF."""
    u = rng.random(n)
    if abs(alpha - 1) < 1e-9:
        return rmin * (rmax / rmin) ** u
    a, b = rmin ** (1 - alpha), rmax ** (1 - alpha)
    return (a + u * (b - a)) ** (1 / (1 - alpha))


def dead_leaves(size: int, seed: int, rmin: float, rmax: float, alpha: float, discs: int) -> np.ndarray:
    """A (size, size, 3) float32 dead-leaves image in [0, 1]; see the module docstring."""
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.float32)
    image[:] = rng.random(3)  # background, seen only where no disc falls
    uncovered = np.ones((size, size), bool)
    left = size * size
    chunk = 4096  # parameters are drawn in chunks: the sequence of discs does not depend on when we stop
    drawn = 0
    while left and drawn < discs:
        n = min(chunk, discs - drawn)
        radii = _radii(rng, n, rmin, rmax, alpha)
        centres = rng.random((n, 2)) * size
        colours = rng.random((n, 3)).astype(np.float32)
        for r, (cy, cx), colour in zip(radii, centres, colours):
            y0, y1 = max(0, int(cy - r)), min(size, int(cy + r) + 1)
            x0, x1 = max(0, int(cx - r)), min(size, int(cx + r) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            ys = np.arange(y0, y1)[:, None] + 0.5 - cy
            xs = np.arange(x0, x1)[None, :] + 0.5 - cx
            hit = (ys * ys + xs * xs <= r * r) & uncovered[y0:y1, x0:x1]
            if hit.any():
                image[y0:y1, x0:x1][hit] = colour  # under every earlier disc: only where none lies yet
                uncovered[y0:y1, x0:x1][hit] = False
                left -= int(hit.sum())
                if not left:
                    break
        drawn += n
    return image


def render(spec: str) -> torch.Tensor:
    """The procedural image of `spec` as a float32 (3, H, W) tensor in [0, 1]."""
    kind, p = parse(spec)
    if kind == "noise":
        image = np.random.default_rng(p["seed"]).random((p["size"], p["size"], 3), dtype=np.float32)
    else:
        image = dead_leaves(p["size"], p["seed"], p["rmin"], p["rmax"], p["alpha"], p["discs"])
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
