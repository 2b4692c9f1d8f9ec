"""What a patch is made of: `PatchConfig` (every parameter of the patch distribution), the
paper's augmentation presets, and `parse_overrides`, the one KEY=VALUE syntax of the CLIs.

    config = make_config("all", size=32, **parse_overrides(["rotation_degrees=10"], "--patch"))

The presets are the paper's ablation switches (PAPER.md section 1): `scale` (area range on, off:
one fixed area), `rotation` (rotation and shear), `jitter` (colour jitter); position is always on.
`data/patches.py` turns a configuration into pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass

from monossl.errors import UserError

# Median accepted area fraction of the default draw (area U[1/500, 1], aspect log-U[3/4, 4/3],
# retried until it fits): 0.436. Used as the one fixed area when the scale switch is off.
DEFAULT_FIXED_AREA = 0.44

FILL_MODES = ("black", "none")


@dataclass(frozen=True)
class PatchConfig:
    """Every parameter of the patch distribution (defaults: the paper's, preset `all`)."""

    size: int = 32  # S: output side in pixels
    initial_crop_fraction: float = 0.5  # step 1: square side = this x the image's short side
    scale: bool = True  # step 2 scale switch: area in area_range (True) or fixed_area (False)
    area_range: tuple[float, float] = (1 / 500, 1.0)  # step 2: area fraction of the crop
    fixed_area: float = DEFAULT_FIXED_AREA  # step 2 with scale off
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)  # step 2: log-uniform aspect w/h
    rotation_degrees: float = 30.0  # step 3: angle uniform in [-r, r]
    shear_degrees: float = 30.0  # step 3: x-shear uniform in [-s, s]
    hflip_prob: float = 0.0  # step 4
    vflip_prob: float = 0.0  # step 4 (off: it breaks RotNet's labels)
    jitter_prob: float = 0.5  # step 6
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    fill: str = "black"  # "black": the released generator's wedges; "none": never a fill pixel

    # ------------------------------------------------------------------ helpers
    @property
    def resize_side(self) -> int:
        """R, the side step 2 resizes to: floor(sqrt(2) * S), as the released generator."""
        return int(math.sqrt(2) * self.size)

    @property
    def crop_offset(self) -> int:
        """Where step 5's S x S crop starts in the R x R image: torchvision's CenterCrop
        offset int(round((R - S) / 2)) (Python rounds halves to even)."""
        return int(round((self.resize_side - self.size) / 2.0))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["area_range"] = list(self.area_range)
        d["aspect_range"] = list(self.aspect_range)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PatchConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown patch parameter(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("area_range", "aspect_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d).validate()

    def validate(self) -> PatchConfig:
        """Raise UserError (one line) for a value that makes no sense; return self."""

        def num(name: str, value: object):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, not {value!r}")
            return float(value)

        def prob(name: str):
            v = num(name, getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], not {v}")

        def pair(name: str, low_ok: Callable[[float, float], bool]):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise UserError(f"{name} must be two numbers (min, max), not {value!r}")
            lo, hi = num(name, value[0]), num(name, value[1])
            if lo > hi:
                raise UserError(f"{name} is inverted or empty: min {lo:g} > max {hi:g}")
            if not low_ok(lo, hi):
                raise UserError(f"{name} ({lo:g}, {hi:g}) is out of bounds")
            return lo, hi

        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise UserError(f"size must be a positive integer, not {self.size!r}")
        if self.size > 8192:
            raise UserError(f"size {self.size} is larger than the supported 8192")
        f = num("initial_crop_fraction", self.initial_crop_fraction)
        if not 0.0 < f <= 1.0:
            raise UserError(f"initial_crop_fraction must be in (0, 1], not {f}")
        if not isinstance(self.scale, bool):
            raise UserError(f"scale must be true or false, not {self.scale!r}")
        lo, hi = pair("area_range", lambda lo, hi: 0.0 < lo and hi <= 1.0)
        a = num("fixed_area", self.fixed_area)
        if not 0.0 < a <= 1.0:
            raise UserError(f"fixed_area must be in (0, 1], not {a}")
        pair("aspect_range", lambda lo, hi: lo > 0.0)
        r = num("rotation_degrees", self.rotation_degrees)
        if not 0.0 <= r <= 180.0:
            raise UserError(f"rotation_degrees must be in [0, 180], not {r}")
        s = num("shear_degrees", self.shear_degrees)
        if not 0.0 <= s < 80.0:
            raise UserError(f"shear_degrees must be in [0, 80), not {s}")
        for name in ("hflip_prob", "vflip_prob", "jitter_prob"):
            prob(name)
        for name in ("brightness", "contrast", "saturation"):
            v = num(name, getattr(self, name))
            if v < 0:
                raise UserError(f"{name} must be >= 0, not {v}")
        h = num("hue", self.hue)
        if not 0.0 <= h <= 0.5:
            raise UserError(f"hue must be in [0, 0.5], not {h}")
        if self.fill not in FILL_MODES:
            raise UserError(f"fill must be one of {', '.join(FILL_MODES)}, not {self.fill!r}")
        return self

    def min_short_side(self) -> int:
        """The smallest image short side this configuration accepts: its initial crop
        (initial_crop_fraction x short side) must be at least the patch size."""
        return math.ceil(self.size / self.initial_crop_fraction - 1e-9)


# The ablation switches (PAPER.md section 1): scale = area range on (off: fixed_area),
# rotation = rotation AND shear (off: none), jitter = step 6 (off: none). Position always on.
_SWITCH_OFF: dict[str, dict[str, bool | float]] = {
    "scale": {"scale": False},
    "rotation": {"rotation_degrees": 0.0, "shear_degrees": 0.0},
    "jitter": {"jitter_prob": 0.0},
}
_PRESET_SWITCHES = {
    "none": (),
    "jitter": ("jitter",),
    "rotation": ("rotation",),
    "scale": ("scale",),
    "rotation+jitter": ("rotation", "jitter"),
    "rotation+scale": ("rotation", "scale"),
    "jitter+scale": ("jitter", "scale"),
    "all": ("rotation", "jitter", "scale"),
}


def _preset_overrides(switches_on: Collection[str]) -> dict:
    out: dict = {}
    for switch, off in _SWITCH_OFF.items():
        if switch not in switches_on:
            out.update(off)
    return out


PRESETS: dict[str, dict] = {name: _preset_overrides(on) for name, on in _PRESET_SWITCHES.items()}


def make_config(preset: str = "all", **overrides) -> PatchConfig:
    """The preset's configuration with `overrides` (any PatchConfig field) applied, validated."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PatchConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise UserError(
            f"unknown patch parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(fields))}"
        )
    values = dict(PRESETS[preset])
    values.update(overrides)
    for key in ("area_range", "aspect_range"):
        if key in values and isinstance(values[key], list):
            values[key] = tuple(values[key])
    return dataclasses.replace(PatchConfig(), **values).validate()


# ---------------------------------------------------------------------------- KEY=VALUE overrides

def parse_overrides(items: list[str] | None, option: str, config_class: type = PatchConfig,
                    what: str = "patch parameter") -> dict:
    """['rotation_degrees=10', 'area_range=0.01,1'] -> {field: value}, each value typed by its field in
    `config_class` (a dataclass: PatchConfig, or a method's Config for `pretrain --method-option`; float
    fields always float, so 10 and 10.0 give equal configurations and equal `to_dict()`s). A field whose
    default is None takes `none` or a number (or MIN,MAX). Errors are one line naming `option`."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"{option} expects KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in defaults:
            raise UserError(f"{option}: unknown {what} {key!r}; valid: {', '.join(defaults)}")
        default = defaults[key]
        if default is None or default is dataclasses.MISSING:
            out[key] = _parse_untyped(option, key, value)
        else:
            out[key] = _parse_value(option, key, value, default)
    return out


def _parse_untyped(option: str, key: str, text: str) -> object:
    """A value for a field without a typed default: none, a number, MIN,MAX, or else a string."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        if len(parts) == 2:
            return tuple(_number(p) for p in parts)
        number = _number(text)
        return int(number) if number.is_integer() and "." not in text and "/" not in text else number
    except (ValueError, ZeroDivisionError):
        return text.strip("\"'")


def _parse_value(option: str, key: str, text: str, default: object):
    """One override value typed like the field's default: bools as true/false (yes/no, on/off,
    1/0), pairs as `lo,hi` (also `(lo, hi)` or JSON's `[lo, hi]`), numbers as decimals or
    fractions such as 1/500."""
    text = text.strip()
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return _number(text)
        if isinstance(default, tuple):
            bare = text.strip("()[]")
            parts = [p for p in bare.split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError
            return tuple(_number(p) for p in parts)
        return text.strip("\"'")  # a string field; quotes allowed, as JSON writes them
    except (ValueError, ZeroDivisionError):  # ZeroDivisionError: a fraction such as 1/0
        kind = type(default).__name__ if not isinstance(default, tuple) else "two numbers min,max"
        raise UserError(f"{option} {key}={text}: expected {kind}") from None


def _number(text: str) -> float:
    text = text.strip()
    if "/" in text:  # allow fractions such as 1/500 or 3/4
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)
