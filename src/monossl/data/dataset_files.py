"""Labelled datasets kept as files: where a named one is searched, its download, and safe reading.

Shared by the named datasets (data/cifar.py: CIFAR-10 and CIFAR-100, data/stl10.py: STL-10). Each
describes itself as a `Layout` (its name, the folder torchvision downloads, an optional npz pair,
how to fetch it); `find(layout, path, download)` locates it. Without a path it searches each
$MONOSSL_DATA directory (os.pathsep-separated), then ~/.cache/monossl, trying the root itself and
its `<name>/` subfolder; when nothing is found and downloading is allowed, `layout.fetch` puts
torchvision's files in `<first root>/<name>/`, where the search finds them next time.

Reading: `read_pickle` unpickles only plain data (nothing read from disk may run code),
`read_npz_xy` reads an npz with `x` and `y`, `check_arrays` validates images (N, side, side, 3) and
labels, and `to_tensor_images` builds the `TensorImages` every named dataset comes back as.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monossl.data.image_sets import TensorImages
from monossl.errors import UserError, first_line


@dataclass(frozen=True)
class Layout:
    """How one named dataset lies on disk."""

    name: str  # the spec name and the subfolder searched: "cifar10"
    title: str  # for messages: "CIFAR-10"
    folder: str  # the folder torchvision downloads: "cifar-10-batches-py"
    marker: str  # a file that folder always holds: "data_batch_1"
    contents: str  # what that folder holds, for messages: "data_batch_1..5, test_batch"
    fetch: Callable[[Path], None]  # torchvision's download into a directory (needs the network)
    npz: dict[str, str] | None = None  # {"train": "cifar10_train.npz", "test": "cifar10_test.npz"}, if supported

    def expected(self) -> str:
        npz = f"{self.npz['train']} + {self.npz['test']}, or " if self.npz else ""
        return f"{npz}a {self.folder}/ folder ({self.contents})"


def search_roots() -> list[Path]:
    """Where a named dataset is looked for: each $MONOSSL_DATA entry, then ~/.cache/monossl."""
    roots = [Path(p).expanduser() for p in os.environ.get("MONOSSL_DATA", "").split(os.pathsep) if p.strip()]
    roots.append(Path.home() / ".cache" / "monossl")
    return roots


def download_allowed(download: bool) -> bool:
    return download or os.environ.get("MONOSSL_DOWNLOAD", "") not in ("", "0")


def describe_dir(d: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def locate(layout: Layout, d: Path):
    """('npz', dir) or ('torchvision', the downloaded folder) if `d` or `d/<name>` holds the dataset."""
    for cand in (d, d / layout.name):
        if not cand.is_dir():
            continue
        if layout.npz and all((cand / f).is_file() for f in layout.npz.values()):
            return "npz", cand
        if cand.name == layout.folder and (cand / layout.marker).exists():
            return "torchvision", cand
        if (cand / layout.folder).is_dir():
            return "torchvision", cand / layout.folder
    return None


def find(layout: Layout, path: Path | None = None, download: bool = False) -> tuple[str, Path]:
    """Locate `layout`'s dataset at `path`, or by the search (and download) when `path` is None."""
    if path is not None:
        return _find_at(layout, path)
    roots = search_roots()
    for root in roots:
        found = locate(layout, root)
        if found:
            return found
    if download_allowed(download):
        return _download(layout, roots[0] / layout.name)
    where = ", ".join(str(r) + ("" if r.exists() else " (missing)") for r in roots)
    raise UserError(
        f"{layout.title} not found: looked for {layout.expected()} in {where} (and their {layout.name}/ "
        f"subfolders); set MONOSSL_DATA=DIR, pass --data {layout.name}:PATH, "
        f"or set MONOSSL_DOWNLOAD=1 to let torchvision download it"
    )


def _find_at(layout: Layout, path: Path) -> tuple[str, Path]:
    spec = f"{layout.name}:{path}"
    if not path.exists():
        raise UserError(f"{spec}: no such directory")
    if path.is_file():
        if layout.npz and path.name in layout.npz.values():
            path = path.parent
        else:
            raise UserError(f"{spec} is a file; give the directory holding {layout.expected()}")
    found = locate(layout, path)
    if found:
        return found
    npz = layout.npz or {}
    for cand in (path, path / layout.name):
        present = [f for f in npz.values() if (cand / f).is_file()]
        if present:
            missing = [f for f in npz.values() if f not in present]
            raise UserError(f"{spec}: {cand} has {present[0]} but not {missing[0]}")
    raise UserError(f"{spec} is not a {layout.title} directory: expected {layout.expected()}, "
                    f"directly or in {layout.name}/; {describe_dir(path)}")


def _download(layout: Layout, target: Path) -> tuple[str, Path]:
    """torchvision's download code path (layout.fetch) into `target`, then the files it left there."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        layout.fetch(target)
    except Exception as exc:
        raise UserError(f"downloading {layout.title} into {target} failed: {first_line(exc)}") from None
    found = locate(layout, target)
    if not found:
        raise UserError(f"downloaded {layout.title} into {target}, but {layout.folder}/ is not there")
    return found


def require_file(where: Path, name: str, layout: Layout) -> Path:
    path = where / name
    if not path.is_file():
        raise UserError(f"{where}: {name} is missing (a {layout.folder} folder holds {layout.contents})")
    return path


# ----------------------------------------------------------------------------- arrays


def read_npz_xy(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The arrays `x` and `y` of an npz file (not allowing pickled objects)."""
    try:
        with np.load(path) as d:
            if "x" not in d.files or "y" not in d.files:
                raise UserError(f"{path}: expected arrays 'x' and 'y', found {', '.join(d.files) or 'none'}")
            return d["x"], d["y"]
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{path}: not a readable npz file ({first_line(exc)})") from None


def check_arrays(x: np.ndarray, y: np.ndarray, where: str, num_classes: int, side: int = 32) -> None:
    """Images uint8 (N, side, side, 3) with N > 0; labels integer (N,) in 0..num_classes-1."""
    if x.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (side, side, 3):
        raise UserError(f"{where}: images must have shape (N, {side}, {side}, 3), got {x.shape}")
    if len(x) == 0:
        raise UserError(f"{where}: holds no images")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{where}: expected {len(x)} labels of shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"{where}: labels must lie in 0..{num_classes - 1}, found {lo}..{hi}")


def to_tensor_images(x_hwc: np.ndarray, y: np.ndarray, classes: Sequence[str], source: str) -> TensorImages:
    """(N, H, W, 3) uint8 + (N,) labels -> TensorImages with images (N, 3, H, W)."""
    images = torch.from_numpy(np.ascontiguousarray(x_hwc)).permute(0, 3, 1, 2).contiguous()
    return TensorImages(images, torch.from_numpy(y.astype(np.int64)), classes, source)


def class_names(names: Sequence[str | bytes] | None, count: int, default: Sequence[str]):
    """`names` (bytes or str) when there are `count` of them, else `default`."""
    if names is not None and len(names) == count:
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(default)


# ----------------------------------------------------------------------------- pickles


class _NotAllowed(pickle.UnpicklingError):
    """A global the dataset pickles never need; the message is its dotted name."""


class _DataUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR pickles hold: dicts, lists, strings, bytes, ints and numpy
    arrays. A pickle may call any global it names; these ones only rebuild data."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # numpy 1 / 2
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # arrays, protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled with protocol 2 by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _NotAllowed(f"{module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path, title: str) -> dict:
    """A pickled dict of plain data, its bytes keys decoded; `title` names the format in errors."""
    try:
        with open(path, "rb") as f:
            obj = _DataUnpickler(f, encoding="bytes").load()
    except _NotAllowed as exc:
        raise UserError(f"{path}: not a {title} pickle: it would call {exc} when loaded "
                        "(only arrays, bytes, lists, dicts, strings and ints are read)") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable {title} pickle ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
