"""Patches of one (or a few) images as a deterministic, batched stream (PAPER.md section 1).

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
  hash (SplitMix64 finaliser) of (seed, i, slot); no global RNG state, no per-process
  state. The draw is vectorised over a batch in numpy float64, so the parameters are
  bit-identical in every process, batch, worker and device. Pixels are bit-identical
  across batch sizes and worker counts on one device (the only reduction, the patch mean
  for contrast, is made exact by summing integers); CPU and CUDA agree to float rounding.
* **One resampling.** Steps 1-5 compose into one affine map from output pixels to source
  pixels, sampled once with `grid_sample`.
* **Antialiased.** Each source image is stored as an image pyramid (each level made by
  a 2x decimation with Pillow's bicubic filter) packed into one texture; a patch samples
  the two levels around its level of detail log2(source pixels per output pixel) and
  blends them (trilinear mip-mapping), so a 960 -> 32 shrink matches Pillow's
  antialiased resize instead of aliasing.
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

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from monossl.errors import UserError

# Luma weights of torchvision's rgb_to_grayscale (used by contrast and saturation).
GREY = (0.2989, 0.587, 0.114)

# Median accepted area fraction of the default draw (area U[1/500, 1], aspect log-U[3/4, 4/3],
# retried until it fits): 0.436. Used as the one fixed area when the scale switch is off.
DEFAULT_FIXED_AREA = 0.44

FILL_MODES = ("black", "none")

# Antialiasing: the source is prefiltered at LEVELS_PER_OCTAVE sizes per octave; a patch
# samples (bilinear) the level k = floor(LEVELS_PER_OCTAVE * log2(source pixels per output
# pixel)), i.e. the smallest level whose texels are not larger than the output pixels.
# Output pixels are then 1 to 1.41 texels apart: no aliasing, little extra blur.
LEVELS_PER_OCTAVE = 2


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
    def from_dict(cls, d: dict) -> "PatchConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown patch parameter(s): {', '.join(sorted(unknown))}")
        d = dict(d)
        for key in ("area_range", "aspect_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d).validate()

    def validate(self) -> "PatchConfig":
        """Raise UserError (one line) for a value that makes no sense; return self."""

        def num(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, not {value!r}")
            return float(value)

        def prob(name):
            v = num(name, getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], not {v}")

        def pair(name, low_ok):
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
_SWITCH_OFF = {
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


def _preset_overrides(switches_on) -> dict:
    out = {}
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


# ---------------------------------------------------------------------------- randomness
# Counter-based: u(seed, index, slot) = mix(mix(key(seed) ^ mix(index + G)) + (slot + 1) G),
# with mix the SplitMix64 finaliser. Pure function of its inputs, vectorised in numpy.

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)

# Slots (which random number of a patch drives what).
SLOT_SOURCE, SLOT_JITTER, SLOT_BRIGHT, SLOT_CONTRAST, SLOT_SAT, SLOT_HUE = 0, 1, 2, 3, 4, 5
SLOT_HFLIP, SLOT_VFLIP, SLOT_ANGLE, SLOT_SHEAR = 6, 7, 8, 9
SLOT_CROP_X, SLOT_CROP_Y, SLOT_POS_X, SLOT_POS_Y = 10, 11, 12, 13
SLOT_ATTEMPTS = 14  # attempt k uses slots 14 + 2k (area) and 15 + 2k (aspect)
FIRST_ROUND = 8  # attempts drawn for every patch at once; more only for the rare misses
MAX_ATTEMPTS = 100  # then the last draw is shrunk until it fits (only degenerate configs)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _patch_keys(seed: int, indices: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64) * _G + np.uint64(0x632BE59BD9B4E019))
        return _mix(key ^ _mix(indices.astype(np.uint64) + _G))


def _uniforms(keys: np.ndarray, slots) -> np.ndarray:
    """(len(keys), len(slots)) float64 uniforms in [0, 1), 53 random bits each."""
    slots = np.asarray(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix(keys[:, None] + (slots[None, :] + np.uint64(1)) * _G)
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


def uniforms(seed: int, indices, slots) -> np.ndarray:
    """The raw random numbers of patches `indices` (for tests and tools)."""
    return _uniforms(_patch_keys(int(seed), np.asarray(indices, dtype=np.int64)), slots)


# ---------------------------------------------------------------------------- geometry

def _inverse_warp(angle_deg: np.ndarray, shear_deg: np.ndarray) -> np.ndarray:
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
    fitted: np.ndarray = field(default=None)

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, sel) -> "PatchParams":
        return PatchParams(**{f.name: getattr(self, f.name)[sel] for f in dataclasses.fields(self)})


def colour_matrices(brightness, saturation, hue) -> np.ndarray:
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


# ---------------------------------------------------------------------------- pyramid

class _Pyramid:
    """An image at LEVELS_PER_OCTAVE sizes per octave (level k: 2^(-k/2) x the size), each
    level made from the full image with the antialiased bicubic resize Pillow uses
    (`F.interpolate(antialias=True)`), all shelf-packed into one texture so one
    `grid_sample` call serves every patch of the image.

    Each level has a one-texel replicated border, so a bilinear sample up to half a texel
    outside a level reads that level's edge, never its neighbour. `table[k] = (x offset,
    y offset, width, height)` of level k's interior. Values are clamped to [0, 1] (the
    bicubic filter rings slightly), so every sample is in [0, 1].
    """

    def __init__(self, image: torch.Tensor, min_side: int = 4):
        h0, w0 = image.shape[1:]
        levels = [image[None].clamp(0.0, 1.0)]
        k = 1
        while True:
            f = 2.0 ** (-k / LEVELS_PER_OCTAVE)
            h, w = round(h0 * f), round(w0 * f)
            if min(h, w) < min_side:
                break
            lv = F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            levels.append(lv.clamp_(0.0, 1.0))
            k += 1
        # shelf packing, largest first; shelf width = the two largest levels side by side
        sizes = [(lv.shape[2] + 2, lv.shape[3] + 2) for lv in levels]
        width = sizes[0][1] + (sizes[1][1] if len(sizes) > 1 else 0)
        places, x, y, shelf_h = [], 0, 0, 0
        for h, w in sizes:
            if x + w > width:
                x, y, shelf_h = 0, y + shelf_h, 0
            places.append((x, y))
            x, shelf_h = x + w, max(shelf_h, h)
        height = y + shelf_h
        tex = image.new_zeros(1, 3, height, width)
        for (ox, oy), lv in zip(places, levels):
            h, w = lv.shape[2:]
            tex[:, :, oy:oy + h + 2, ox:ox + w + 2] = F.pad(lv, (1, 1, 1, 1), mode="replicate")
        self.texture = tex.contiguous(memory_format=torch.channels_last)
        self.table = np.array([(ox + 1, oy + 1, lv.shape[3], lv.shape[2])
                               for (ox, oy), lv in zip(places, levels)], dtype=np.float64)
        self.max_level = len(levels) - 1
        self.height, self.width = h0, w0


# ---------------------------------------------------------------------------- the stream

def _as_indices(indices) -> np.ndarray:
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


class PatchStream:
    """Patch i of (images, config, seed) on demand, in batches, on any device.

    images: a (3, H, W) tensor, or a list of them (each patch picks its source image
    uniformly, deterministically from (seed, index)), or spec strings for `load_images`.
    names: what to call each image in error messages (its file or built-in name).
    """

    def __init__(self, images, config: PatchConfig | None = None, seed: int = 0,
                 device="cpu", chunk_pixels: int = 1 << 18, names=None):
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
            pyr = _Pyramid(img.detach().to("cpu", torch.float32))
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
    def params(self, indices) -> PatchParams:
        """The sampled parameters of patches `indices` (numpy float64, deterministic)."""
        cfg = self.config
        idx = _as_indices(indices)
        n = len(idx)
        keys = _patch_keys(self.seed, idx)
        u = _uniforms(keys, range(SLOT_ATTEMPTS))
        source = np.minimum((u[:, SLOT_SOURCE] * self.num_images).astype(np.int64), self.num_images - 1)
        w_img, h_img = self.image_sizes[source, 0], self.image_sizes[source, 1]
        c = self.crop_sides[source]
        crop_x = u[:, SLOT_CROP_X] * (w_img - c)
        crop_y = u[:, SLOT_CROP_Y] * (h_img - c)
        angle = (2 * u[:, SLOT_ANGLE] - 1) * cfg.rotation_degrees
        shear = (2 * u[:, SLOT_SHEAR] - 1) * cfg.shear_degrees
        hflip = u[:, SLOT_HFLIP] < cfg.hflip_prob
        vflip = u[:, SLOT_VFLIP] < cfg.vflip_prob
        jitter = u[:, SLOT_JITTER] < cfg.jitter_prob

        def factor(slot, strength):
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
            minv = np.abs(_inverse_warp(angle, shear))
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
            ua = _uniforms(keys[todo], slots)
            ur = _uniforms(keys[todo], slots + 1)
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

    def output_to_source(self, p: PatchParams):
        """(A, t) with source = A @ output + t, in continuous pixel coordinates (pixel
        centres at k + 0.5), and (Q, q) with pre-warp R-space = Q @ output + q."""
        R = self.config.resize_side
        flip = np.ones((len(p), 2))
        flip[p.hflip, 0] = -1.0
        flip[p.vflip, 1] = -1.0
        Q = _inverse_warp(p.angle, p.shear) * flip[:, None, :]  # M^-1 F
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

    def _apply_fill(self, buf, order, needs_fill, Q, q) -> None:
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

    def _jitter(self, buf, order, p: PatchParams) -> None:
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
    def batch(self, indices) -> torch.Tensor:
        """Patches `indices`: (B, 3, S, S) float32 in [0, 1] on the stream's device."""
        return self.render(self.params(indices))

    def __getitem__(self, index: int) -> torch.Tensor:
        if isinstance(index, slice):
            if index.stop is None:
                raise IndexError("a patch stream is unbounded: give a slice with a stop")
            return self.batch(range(*index.indices(index.stop)))
        return self.batch([int(index)])[0]

    def dataset(self, length: int, offset: int = 0) -> "PatchDataset":
        """A torch Dataset of `length` patches: item i is (stream[offset + i], i)."""
        return PatchDataset(self, length, offset)


class PatchDataset(torch.utils.data.Dataset):
    """`length` patches of a stream for a DataLoader: item i = (stream[offset + i], i).

    Implements `__getitems__`, so a DataLoader (any number of workers) renders each batch
    with one `stream.batch` call. With a CUDA stream use num_workers=0.
    """

    def __init__(self, stream: PatchStream, length: int, offset: int = 0):
        if length < 0 or offset < 0:
            raise UserError(f"dataset length and offset must be >= 0, not {length} and {offset}")
        self.stream, self.length, self.offset = stream, int(length), int(offset)

    def __len__(self) -> int:
        return self.length

    def _check(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"patch {i} out of range for a dataset of {self.length}")
        return i % self.length if self.length else i

    def __getitem__(self, i):
        i = self._check(int(i))
        return self.stream[self.offset + i], i

    def __getitems__(self, indices):
        idx = [self._check(int(i)) for i in indices]
        x = self.stream.batch(np.asarray(idx, dtype=np.int64) + self.offset)
        return [(x[j], i) for j, i in enumerate(idx)]
