"""Source images: load any image Pillow reads as an RGB float tensor, plus built-in photographs.

`load_image(spec)` takes a file path, `builtin:NAME` or `procedural:KIND` (data/procedural.py:
dead leaves, noise) and returns a float32 tensor of
shape (3, H, W) with values in [0, 1]:

* RGB, greyscale (L, 1), palette (P) and 16-bit images (I;16*, I: divided by 65535) are
  converted to RGB; greyscale is repeated over the three channels.
* CMYK, YCbCr, LAB and HSV go through Pillow's own conversion to RGB (no ICC colour
  management).
* **Alpha** (RGBA, LA, PA, palette with transparency) is composited over **white**: a
  transparent pixel becomes white, half-transparent pixels are blended with white. White
  rather than black so that transparent areas can never be confused with the black fill
  wedges of the patch pipeline (`fill="black"`, see `data/patches.py`).
* EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), so a phone photo comes out
  the way it is displayed.
* The image is fully decoded at load time, so a truncated file fails here with a one-line
  `UserError`, not half-way through generating patches.

Built-in images (`builtin:NAME`) are photographs bundled inside scikit-image's wheel (no
network needed); `builtin_table()` (`monossl images`) lists them with size and licence.

The default image is `astronaut` (Eileen Collins, NASA, public domain): a busy, colourful
photograph -- a face, an orange suit, a flag, hardware and text -- so random patches show
edges, textures and colours at every scale. The paper found that busier images teach more
(PAPER.md section 1), and a public-domain image can be redistributed with results.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from monossl.data import procedural
from monossl.data.procedural import PROCEDURAL_PREFIX
from monossl.errors import UserError, first_line

BUILTIN_PREFIX = "builtin:"
DEFAULT_IMAGE = "astronaut"

# name -> file in skimage's bundled data folder, size (W, H), licence, description.
# Only images that ship inside the scikit-image wheel (they load without a network).
BUILTINS: dict[str, dict] = {
    "astronaut": {
        "file": "astronaut.png", "size": (512, 512), "licence": "public domain (NASA)",
        "description": "astronaut Eileen Collins with flag and suit: busy, colourful (default)",
    },
    "hubble_deep_field": {
        "file": "hubble_deep_field.jpg", "size": (1000, 872), "licence": "public domain (NASA)",
        "description": "Hubble eXtreme Deep Field: many small galaxies on black",
    },
    "rocket": {
        "file": "rocket.jpg", "size": (640, 427), "licence": "public domain (SpaceX)",
        "description": "Falcon 9 launch: sky, smoke, structures",
    },
    "coffee": {
        "file": "coffee.png", "size": (600, 400), "licence": "CC0 (Rachel Michetti)",
        "description": "coffee cup on wood: smooth porcelain and wood grain",
    },
    "chelsea": {
        "file": "chelsea.png", "size": (451, 300), "licence": "CC0 (Stefan van der Walt)",
        "description": "Chelsea the cat: fur texture, edges at several scales",
    },
    "immunohistochemistry": {
        "file": "ihc.png", "size": (512, 512), "licence": "no known copyright restrictions (CMMI)",
        "description": "stained colonic glands (microscopy)",
    },
    "retina": {
        "file": "retina.jpg", "size": (1411, 1411), "licence": "CC0 (Mikael Haggstrom)",
        "description": "fundus photograph of a retina: plain, large uniform regions",
    },
    "camera": {
        "file": "camera.png", "size": (512, 512), "licence": "CC0 (Lav Varshney)",
        "description": "photographer with camera (greyscale)",
    },
    "coins": {
        "file": "coins.png", "size": (384, 303), "licence": "no known copyright restrictions (Brooklyn Museum)",
        "description": "Greek coins on a grey background (greyscale)",
    },
    "grass": {
        "file": "grass.png", "size": (512, 512), "licence": "CC0 (DeviantArt linolafett)",
        "description": "grass texture (greyscale)",
    },
    "gravel": {
        "file": "gravel.png", "size": (512, 512), "licence": "CC0 (CC0Textures)",
        "description": "gravel texture (greyscale)",
    },
    "brick": {
        "file": "brick.png", "size": (512, 512), "licence": "CC0 (CC0Textures)",
        "description": "brick wall texture (greyscale)",
    },
}

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def builtin_names() -> list[str]:
    return list(BUILTINS)


def _skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise UserError(f"built-in images need scikit-image, which failed to import: {exc}") from None
    return Path(skimage.data.data_dir)


def resolve_path(spec: str) -> Path:
    """The file behind a spec: a path as given, or the bundled file of `builtin:NAME`."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name not in BUILTINS:
            raise UserError(
                f"unknown built-in image {name!r}; valid names: {', '.join(BUILTINS)}"
            )
        path = _skimage_data_dir() / BUILTINS[name]["file"]
        if not path.is_file():
            raise UserError(f"built-in image {name!r} is missing from scikit-image's data folder ({path})")
        return path
    return Path(spec)


def _open_fully(path: Path):
    """Open and fully decode an image, turning every failure into a one-line UserError."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise UserError(f"image file not found: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image file")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image Pillow can read") from None
    except Image.DecompressionBombError as exc:  # its header declares more pixels than Pillow decodes
        raise UserError(f"{path} is too large to decode: {first_line(exc)}") from None
    except OSError as exc:
        raise UserError(f"cannot open image {path}: {exc.strerror or exc}") from None
    try:
        img.load()  # force the full decode: truncated files fail here, not later
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path} is truncated or corrupt: {first_line(exc)}") from None
    return img


def open_rgb(path: str | Path):
    """One image file of a dataset as an RGB PIL image (as torchvision's loader gives it); a file
    Pillow cannot read, or will not decode for its size, is a one-line UserError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: not a readable image ({first_line(exc)})") from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image (any mode) -> float32 (3, H, W) in [0, 1]; alpha composited over white."""
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # malformed EXIF must not make a readable image unreadable
        pass
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img).astype(np.float32) / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    else:
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            mode == "P" and "transparency" in img.info
        ) or (mode in ("L", "RGB") and "transparency" in img.info)
        if has_alpha:
            rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
            alpha = rgba[:, :, 3:4]
            arr = rgba[:, :, :3] * alpha + (1.0 - alpha)  # over white
        else:
            arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return tensor.float().contiguous()


def load_image(spec: str | Path) -> torch.Tensor:
    """Load `spec` (a file path, `builtin:NAME` or `procedural:KIND[:key=value...]`, see
    data/procedural.py) as a float32 (3, H, W) tensor in [0, 1].

    Alpha is composited over white; EXIF orientation is applied; 16-bit images are scaled
    by 1/65535. Raises `UserError` (one line) for a missing file, a directory, a file that
    is not an image, a truncated image or an unknown built-in name.
    """
    if str(spec).startswith(PROCEDURAL_PREFIX):
        return procedural.render(str(spec))
    path = resolve_path(str(spec))
    img = _open_fully(path)
    try:
        return pil_to_tensor(img)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot convert image {path} to RGB: {exc}") from None


def load_images(specs: str | Path | Iterable[str | Path]) -> list[torch.Tensor]:
    """Load several images (the paper's 10-image "deka" variant); see `load_image`."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise UserError("no image given")
    return [load_image(s) for s in specs]


def split_specs(values: Iterable[str] | None) -> list[str]:
    """`--image a.png --image b.png,builtin:coffee` -> ['a.png', 'b.png', 'builtin:coffee'].
    A value naming a file as given is one image, even with a comma in its name."""
    out = []
    for value in values or []:
        if os.path.exists(value):
            out.append(str(value))
        else:
            out.extend(part.strip() for part in str(value).split(",") if part.strip())
    return out


def describe_source(spec: str | Path) -> dict:
    """What identifies a source image in a result file: spec, resolved path, size and sha256
    (of the file; of the rendered float32 pixels for a procedural image)."""
    if str(spec).startswith(PROCEDURAL_PREFIX):
        pixels = procedural.render(str(spec)).numpy().tobytes()
        return {"spec": str(spec), "path": None, "sha256": hashlib.sha256(pixels).hexdigest()}
    path = resolve_path(str(spec))
    _open_fully(path)  # same errors as load_image
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"spec": str(spec), "path": str(path), "sha256": digest}


def builtin_table(check: bool = False) -> list[dict]:
    """The built-in images, one dict each: name (`builtin:NAME`), width, height, licence,
    description and default (True for DEFAULT_IMAGE). With `check`, every image is loaded
    (verifying the bundled files) and its size is the loaded one."""
    rows = []
    for name, info in BUILTINS.items():
        w, h = info["size"]
        if check:
            h, w = load_image(BUILTIN_PREFIX + name).shape[1:]
        rows.append({"name": BUILTIN_PREFIX + name, "width": int(w), "height": int(h),
                     "licence": info["licence"], "description": info["description"],
                     "default": name == DEFAULT_IMAGE})
    return rows
