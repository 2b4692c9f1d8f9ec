"""Sources that draw a new image for every sample, with the patch stream's interface, and the one
place that turns `--image` specs into a stream (`open_stream`).

    procedural:fractal[:key=value...]          a new IFS fractal per sample (data/fractals.py)
    procedural:fractal:one[:key=value...]      one IFS, its parameters perturbed per sample
    procedural:fractal:N[:key=value...]        N IFS (N = 1..1,000,000), each sample one of them, perturbed
    procedural:spectral[:key=value...]         1 / f^a coloured noise (data/spectral.py)

Keys: fractal `density` (points per pixel, default 1, in (0, 16]); with `one` or N also `perturb`
(delta, the largest change of each map parameter, default 0.1, in [0, 0.5]); spectral `amin` and
`amax` (the range of the exponent a, default 0.5 and 2.5, 0 <= amin <= amax <= 4).

    stream = ProceduralStream("procedural:fractal:100", size=32, seed=0)
    x = stream.batch(range(256))        # (256, 3, 32, 32) float32 in [0, 1]

Sample i is a pure function of (spec, size, seed, i), as a patch is of (images, config, seed, i): every
random number comes from the counter-based key of (seed, i) (data/counter_rng.py). With N systems,
sample i uses system floor(u N), u a uniform of its key, and system j is the one sample j of
`procedural:fractal` draws (so the N systems are a function of the seed too). Images are rendered at
the method's patch size directly: the augmentation preset (crop, rotation, jitter) applies to
photographs and the one-image procedural sources, and the methods add their own views on top as they
do for every source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from monossl.data import fractals, procedural
from monossl.data.counter_rng import key_uniforms, patch_keys
from monossl.data.patch_config import PatchConfig
from monossl.data.patches import PatchDataset, PatchStream, _as_indices
from monossl.data.spectral import DEFAULT_EXPONENTS, SpectralNoise
from monossl.errors import UserError

MAX_SYSTEMS = 1_000_000
SLOT_SYSTEM = 0  # sample slot: which of the N systems
# key -> (type, default, low, high, whether low is allowed)
_KEYS = {
    "fractal": {"density": (float, 1.0, 0.0, 16.0, False), "perturb": (float, 0.1, 0.0, 0.5, True)},
    "spectral": {"amin": (float, DEFAULT_EXPONENTS[0], 0.0, 4.0, True),
                 "amax": (float, DEFAULT_EXPONENTS[1], 0.0, 4.0, True)},
}


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """'procedural:fractal:100:perturb=0.05' -> ('fractal', {'systems': 100, 'perturb': 0.05, ...}).
    systems is None for a new system per sample. Every problem is a one-line UserError."""
    kind, *items = str(spec)[len(procedural.PROCEDURAL_PREFIX):].split(":")
    if kind not in procedural.PER_SAMPLE_KINDS:
        raise procedural.unknown_kind(kind, spec)
    params: dict[str, Any] = {}  # systems: int | None; the other keys: floats
    if kind == "fractal":
        params["systems"] = None
        if items and "=" not in items[0]:
            params["systems"] = _systems(items.pop(0), spec)
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in _KEYS[kind]:
            raise UserError(f"{spec}: {item!r} is not KEY=VALUE with KEY one of {', '.join(_KEYS[kind])}")
        if key in params:
            raise UserError(f"{spec}: {key} is given twice")
        try:
            params[key] = _KEYS[kind][key][0](text)
        except ValueError:
            raise UserError(f"{spec}: {key} wants a number, got {text!r}") from None
    for key, (_, default, low, high, low_ok) in _KEYS[kind].items():
        value = params.setdefault(key, default)
        if not ((low <= value if low_ok else low < value) and value <= high):
            raise UserError(f"{spec}: {key} must be in {'[' if low_ok else '('}{low:g}, {high:g}], got {value:g}")
    if kind == "fractal" and params["systems"] is None and any(i.partition("=")[0] == "perturb" for i in items):
        raise UserError(f"{spec}: perturb applies to procedural:fractal:one and procedural:fractal:N, "
                        "not to a new system per sample")
    if kind == "spectral" and params["amin"] > params["amax"]:
        raise UserError(f"{spec}: wants amin <= amax, got amin={params['amin']:g}, amax={params['amax']:g}")
    return kind, params


def _systems(text: str, spec: str) -> int:
    if text == "one":
        return 1
    if not text.isdigit() or not 1 <= int(text) <= MAX_SYSTEMS:
        raise UserError(f"{spec}: the number of fractal systems must be 'one' or an integer 1..{MAX_SYSTEMS:,}, "
                        f"got {text!r}")
    return int(text)


class ProceduralStream:
    """Sample i of a per-sample procedural source (see the module docstring) on demand, in batches, on
    any device: the same faces as `PatchStream` (`batch`, `[i]`, `dataset`)."""

    def __init__(self, spec: str, size: int, seed: int = 0, device: torch.device | str = "cpu",
                 chunk_pixels: int | None = None):
        self.kind, self.params = parse(spec)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"seed must be a non-negative integer, not {seed!r}")
        if not 8 <= int(size) <= 1024:
            raise UserError(f"{spec}: the sample size must be 8..1024 pixels, got {size}")
        self.spec, self.size, self.seed = str(spec), int(size), int(seed)
        self.device = torch.device(device)
        # samples rendered at once: the fractals' many small steps want large batches, the noise's large
        # tensors small ones (at 64 px, 2^16 pixels a chunk was twice as fast as 2^20 on a busy machine)
        pixels = int(chunk_pixels) if chunk_pixels else (1 << 20 if self.kind == "fractal" else 1 << 16)
        self.chunk = max(1, pixels // (self.size * self.size))
        if self.kind == "spectral":
            self._noise = SpectralNoise(self.size, (self.params["amin"], self.params["amax"]), self.device)

    def systems(self, keys: np.ndarray) -> fractals.Systems:
        """The IFS of the samples whose counter-based keys are `keys`."""
        count = self.params["systems"]
        if count is None:
            return fractals.draw_systems(keys)
        chosen = np.floor(key_uniforms(keys, [SLOT_SYSTEM])[:, 0] * count).astype(np.int64)
        chosen = np.minimum(chosen, count - 1)
        return fractals.perturb(fractals.draw_systems(patch_keys(self.seed, chosen)), keys, self.params["perturb"])

    def _render(self, indices: np.ndarray) -> torch.Tensor:
        keys = patch_keys(self.seed, indices)
        if self.kind == "spectral":
            return self._noise.render(keys)
        return fractals.render(self.systems(keys), keys, self.size, self.params["density"], self.device)

    def batch(self, indices: npt.ArrayLike | torch.Tensor) -> torch.Tensor:
        """Samples `indices`: (B, 3, S, S) float32 in [0, 1] on the stream's device."""
        idx = _as_indices(indices)
        if len(idx) <= self.chunk:
            return self._render(idx)
        return torch.cat([self._render(idx[a:a + self.chunk]) for a in range(0, len(idx), self.chunk)])

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, slice):
            if index.stop is None:
                raise IndexError("a procedural stream is unbounded: give a slice with a stop")
            return self.batch(range(*index.indices(index.stop)))
        return self.batch([int(index)])[0]

    def describe(self) -> dict:
        """What identifies the source in a result file, as `sources.describe_source` does for an image
        file: the spec and a sha256 of its first samples' pixels (rendered on the CPU with seed 0, so
        it is the same on every device and changes when the generator does)."""
        import hashlib

        first = ProceduralStream(self.spec, self.size, seed=0, device="cpu").batch(range(8))
        return {"spec": self.spec, "path": None, "sha256": hashlib.sha256(first.numpy().tobytes()).hexdigest()}

    def dataset(self, length: int, offset: int = 0) -> PatchDataset:
        """A torch Dataset of `length` samples: item i is (stream[offset + i], i)."""
        return PatchDataset(self, length, offset)


def open_stream(specs: str | Sequence[str], config: PatchConfig, seed: int = 0, device: torch.device | str = "cpu",
                names: Sequence[str] | None = None) -> ProceduralStream | PatchStream:
    """The stream of `--image` specs at `config`'s patch size: a `ProceduralStream` for one per-sample
    source, else the `PatchStream` of the images (files, built-ins, one-image procedural sources)."""
    from monossl.data.sources import load_images

    specs = [specs] if isinstance(specs, str) else list(specs)
    per_sample = [s for s in specs if procedural.is_per_sample(s)]
    if per_sample:
        if len(specs) > 1:
            raise UserError(f"{per_sample[0]} draws a new image per sample: give it as the only --image")
        config = config.validate()
        return ProceduralStream(per_sample[0], config.size, seed=seed, device=device)
    return PatchStream(load_images(specs), config, seed=seed, device=device, names=names or specs)
