"""CIFAR-10 on disk: where plain `cifar10` is found, its two formats, and reading them safely.

Formats: the npz pair `cifar10_train.npz` + `cifar10_test.npz` (`x` uint8 (N, 32, 32, 3) RGB, `y`
(N,) in 0..9: the format of shared/data/cifar10), or `cifar-10-batches-py`, the python pickles
torchvision downloads, read with an unpickler that builds nothing but plain data. The search and
the download are described in data/datasets.py.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from monossl.data.image_sets import TensorImages
from monossl.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NPZ_FILES = {"train": "cifar10_train.npz", "test": "cifar10_test.npz"}
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def search_roots() -> list[Path]:
    """Where plain `cifar10` is looked for: each $MONOSSL_DATA entry, then ~/.cache/monossl."""
    roots = [Path(p).expanduser() for p in os.environ.get("MONOSSL_DATA", "").split(os.pathsep) if p.strip()]
    roots.append(Path.home() / ".cache" / "monossl")
    return roots


def _cifar_in(d: Path):
    """('npz'|'pickle', dir) if `d` holds CIFAR-10 (directly or in cifar10/), else None."""
    for cand in (d, d / "cifar10"):
        if not cand.is_dir():
            continue
        if all((cand / f).is_file() for f in NPZ_FILES.values()):
            return "npz", cand
        if cand.name == PICKLE_DIR and (cand / "data_batch_1").exists():
            return "pickle", cand
        if (cand / PICKLE_DIR).is_dir():
            return "pickle", cand / PICKLE_DIR
    return None


def describe_dir(d: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir())
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def find_cifar10(path: Path | None = None, download: bool = False) -> tuple[str, Path]:
    """Locate CIFAR-10: ('npz', dir with the npz pair) or ('pickle', the cifar-10-batches-py dir)."""
    if path is not None:
        if not path.exists():
            raise UserError(f"cifar10:{path}: no such directory")
        if path.is_file():
            if path.name in NPZ_FILES.values():
                path = path.parent
            else:
                raise UserError(f"cifar10:{path} is a file; give the directory holding "
                                f"{NPZ_FILES['train']} and {NPZ_FILES['test']}, or {PICKLE_DIR}/")
        found = _cifar_in(path)
        if found:
            return found
        for cand in (path, path / "cifar10"):
            present = [f for f in NPZ_FILES.values() if (cand / f).is_file()]
            if present:
                missing = [f for f in NPZ_FILES.values() if f not in present]
                raise UserError(f"cifar10:{path}: {cand} has {present[0]} but not {missing[0]}")
        raise UserError(
            f"cifar10:{path} is not a CIFAR-10 directory: expected {NPZ_FILES['train']} + {NPZ_FILES['test']}, "
            f"or a {PICKLE_DIR}/ folder (data_batch_1..5, test_batch), directly or in cifar10/; {describe_dir(path)}"
        )
    roots = search_roots()
    for root in roots:
        found = _cifar_in(root)
        if found:
            return found
    if download or os.environ.get("MONOSSL_DOWNLOAD", "") not in ("", "0"):
        return _download_cifar10(roots[0])
    where = ", ".join(str(r) + ("" if r.exists() else " (missing)") for r in roots)
    raise UserError(
        f"CIFAR-10 not found: looked for {NPZ_FILES['train']}+{NPZ_FILES['test']} or {PICKLE_DIR}/ in {where} "
        f"(and their cifar10/ subfolders); set MONOSSL_DATA=DIR, pass --data cifar10:PATH, "
        f"or set MONOSSL_DOWNLOAD=1 to let torchvision download it"
    )


def _download_cifar10(root: Path) -> tuple[str, Path]:  # pragma: no cover - needs the network
    """torchvision's download code path; the pickles land in root/cifar10/cifar-10-batches-py."""
    from torchvision.datasets import CIFAR10

    target = root / "cifar10"
    try:
        target.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            CIFAR10(str(target), train=train, download=True)
    except Exception as exc:
        raise UserError(f"downloading CIFAR-10 into {target} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    found = _cifar_in(target)
    if not found:
        raise UserError(f"downloaded CIFAR-10 into {target}, but {PICKLE_DIR}/ is not there")
    return found


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str, num_classes: int = 10) -> None:
    if x.dtype != np.uint8:
        raise UserError(f"{where}: images must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise UserError(f"{where}: images must have shape (N, 32, 32, 3), got {x.shape}")
    if len(x) == 0:
        raise UserError(f"{where}: holds no images")
    if y.ndim != 1 or len(y) != len(x):
        raise UserError(f"{where}: expected {len(x)} labels of shape ({len(x)},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"{where}: labels must lie in 0..{num_classes - 1}, found {lo}..{hi}")


def _to_tensor_images(x: np.ndarray, y: np.ndarray, classes, source: str, hwc: bool) -> TensorImages:
    images = torch.from_numpy(np.ascontiguousarray(x))
    if hwc:
        images = images.permute(0, 3, 1, 2)
    return TensorImages(images.contiguous(), torch.from_numpy(y.astype(np.int64)), classes, source)


def load_cifar_split(fmt: str, where: Path, split: str) -> TensorImages:
    if fmt == "npz":
        path = where / NPZ_FILES[split]
        try:
            with np.load(path) as d:
                if "x" not in d.files or "y" not in d.files:
                    raise UserError(f"{path}: expected arrays 'x' and 'y', found {', '.join(d.files) or 'none'}")
                x, y = d["x"], d["y"]
        except UserError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise UserError(f"{path}: not a readable npz file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        _check_arrays(x, y, str(path))
        return _to_tensor_images(x, y, CIFAR10_CLASSES, f"cifar10:{where}", hwc=True)

    xs, ys = [], []
    for name in PICKLE_FILES[split]:
        path = where / name
        if not path.is_file():
            raise UserError(f"{where}: {name} is missing (a {PICKLE_DIR} folder holds data_batch_1..5 and test_batch)")
        batch = _read_pickle(path)
        data, labels = batch.get("data"), batch.get("labels")
        if data is None or labels is None:
            raise UserError(f"{path}: expected keys 'data' and 'labels', found {', '.join(map(str, batch)) or 'none'}")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(labels))
    x, y = np.concatenate(xs), np.concatenate(ys)
    _check_arrays(x, y, f"{where} ({split})")
    classes = CIFAR10_CLASSES
    meta = where / "batches.meta"
    if meta.is_file():
        names = _read_pickle(meta).get("label_names")
        if names and len(names) == 10:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return _to_tensor_images(x, y, classes, f"cifar10:{where}", hwc=True)


class _NotAllowed(pickle.UnpicklingError):
    """A global the CIFAR-10 pickle format never needs; the message is its dotted name."""


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the cifar-10-batches-py format holds: dicts, lists, strings, bytes, ints
    and numpy arrays. A pickle may call any global it names; these ones only rebuild data."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),  # numpy 1 / 2
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # arrays, protocol 5
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled with protocol 2 by Python 3
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _NotAllowed(f"{module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except _NotAllowed as exc:
        raise UserError(f"{path}: not a CIFAR-10 pickle: it would call {exc} when loaded "
                        "(only arrays, bytes, lists, dicts, strings and ints are read)") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable CIFAR-10 pickle ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}
