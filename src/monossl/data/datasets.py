"""Labelled datasets for probing and supervised baselines: CIFAR-10 and ImageFolder trees.

Dataset specs (what `--data` takes on the command line):

    cifar10          search for CIFAR-10 under each directory of $MONOSSL_DATA (os.pathsep-separated),
                     then under ~/.cache/monossl. In each root, the root itself and its `cifar10/`
                     subfolder are tried, for either format below.
    cifar10:PATH     CIFAR-10 at PATH, in either format:
                       * npz pair: `cifar10_train.npz` + `cifar10_test.npz`, each with
                         `x` uint8 (N, 32, 32, 3) RGB and `y` integer (N,) in 0..9
                         (the format of shared/data/cifar10, see its README);
                       * `cifar-10-batches-py`: the python pickles torchvision downloads
                         (data_batch_1..5, test_batch, batches.meta); PATH may be that folder
                         or the folder holding it.
    folder:PATH      an ImageFolder tree: PATH/train/<class>/<image> and PATH/val/<class>/<image>;
                     train and val must hold the same classes.

Downloading: when nothing is found for plain `cifar10` and `download=True` is passed (or
MONOSSL_DOWNLOAD=1 is set), torchvision's `CIFAR10(download=True)` fetches the pickles into
`<first $MONOSSL_DATA dir or ~/.cache/monossl>/cifar10/cifar-10-batches-py`, where the search finds
them next time.

API:

    load_pair(spec, download=False) -> (train, test)
    load_dataset(spec, split, download=False)        split: "train" | "test" ("val" is an alias)
    subset(dataset, n, seed=0)                       class-balanced subset of n items
    parse_spec(spec) -> (kind, path)                 kind: "cifar10" | "folder"

CIFAR-10 comes back as `TensorImages`: the whole split in memory, `.images` uint8 (N, 3, H, W),
`.labels` int64 (N,), `.classes` (names), `.source` (where it was read). As a torch Dataset its item
is `(float image (3, H, W) in [0, 1], label)`, or `(transform(uint8 image), label)` when a transform
is set. Folders come back as `FolderImages`, a torchvision `ImageFolder` with `.labels`, `.classes`
and `.source` as well; its default transform gives the float tensor of the whole image, and the
probe protocols set their own (`with_transform`). Both have `with_transform(t)` (a shallow copy with
another transform) and `restricted(indices)` (a copy holding only those items).

Every problem with what is found raises `UserError` with one line naming where and what.
"""

from __future__ import annotations

import copy
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as TF

from monossl.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NPZ_FILES = {"train": "cifar10_train.npz", "test": "cifar10_test.npz"}
PICKLE_DIR = "cifar-10-batches-py"
PICKLE_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SPLITS = ("train", "test")
SPEC_HELP = "cifar10 (found via $MONOSSL_DATA or ~/.cache/monossl), cifar10:PATH or folder:PATH"

__all__ = [
    "CIFAR10_CLASSES", "SPEC_HELP", "TensorImages", "FolderImages", "parse_spec", "load_dataset",
    "load_pair", "subset", "validation_split", "search_roots", "find_cifar10",
]


# ----------------------------------------------------------------------------- dataset types


class TensorImages(Dataset):
    """A labelled image set held in memory as one uint8 tensor (N, 3, H, W)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes, source: str = "", transform=None):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{source or 'images'}: expected uint8 images (N, 3, H, W), got "
                            f"{str(images.dtype).replace('torch.', '')} {tuple(images.shape)}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"{source or 'labels'}: expected {len(images)} labels, got shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.source = source
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i]
        img = self.transform(img) if self.transform is not None else img.float().div_(255)
        return img, int(self.labels[i])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def with_transform(self, transform) -> TensorImages:
        out = copy.copy(self)
        out.transform = transform
        return out

    def restricted(self, indices) -> TensorImages:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorImages(self.images[idx], self.labels[idx], self.classes, self.source, self.transform)

    def __repr__(self):
        return f"TensorImages({len(self)} images {tuple(self.images.shape[1:])}, {len(self.classes)} classes, {self.source})"


class _ToFloat:
    """PIL image -> float tensor (3, H, W) in [0, 1] (the default FolderImages transform)."""

    def __call__(self, img):
        return TF.to_dtype(TF.to_image(img), torch.float32, scale=True)


class FolderImages(ImageFolder):
    """A torchvision ImageFolder (root/<class>/<image>) with the monossl dataset interface."""

    def __init__(self, root, source: str = "", transform=None):
        from monossl.data.sources import open_rgb

        # open_rgb: a file Pillow cannot read is a one-line error naming it, not PIL's traceback
        super().__init__(str(root), transform=transform if transform is not None else _ToFloat(), loader=open_rgb)
        self.source = source or str(root)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor(self.targets, dtype=torch.long)

    def with_transform(self, transform) -> FolderImages:
        out = copy.copy(self)
        out.transform = transform
        return out

    def restricted(self, indices) -> FolderImages:
        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in indices]
        out.imgs = out.samples
        out.targets = [s[1] for s in out.samples]
        return out

    def __repr__(self):
        return f"FolderImages({len(self)} images, {len(self.classes)} classes, {self.source})"


# ----------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """'cifar10' -> ('cifar10', None); 'cifar10:PATH' / 'folder:PATH' -> (kind, Path)."""
    if not spec:
        raise UserError(f"empty dataset; use {SPEC_HELP}")
    kind, sep, rest = spec.partition(":")
    if kind == "cifar10" and not sep:
        return "cifar10", None
    if kind in ("cifar10", "folder") and sep:
        if not rest:
            raise UserError(f"dataset {spec!r} names no path; use {kind}:PATH")
        return kind, Path(rest).expanduser()
    if kind == "folder":
        raise UserError("dataset 'folder' needs a path: folder:PATH (PATH/train/<class>/, PATH/val/<class>/)")
    raise UserError(f"unknown dataset {spec!r}; use {SPEC_HELP}")


def _norm_split(split: str) -> str:
    if split == "val":
        return "test"
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use train or test")
    return split


def load_dataset(spec: str, split: str, download: bool = False):
    """One split ('train' or 'test'; 'val' means test) of the dataset `spec`."""
    split = _norm_split(split)
    kind, path = parse_spec(spec)
    if kind == "folder":
        root = check_folder(path)
        return FolderImages(root / ("train" if split == "train" else "val"), source=f"folder:{root}")
    fmt, where = find_cifar10(path, download=download)
    return _load_cifar_split(fmt, where, split)


def load_pair(spec: str, download: bool = False):
    """(train, test) of the dataset `spec`, validated together (same classes)."""
    kind, path = parse_spec(spec)
    if kind == "folder":
        root = check_folder(path)
        src = f"folder:{root}"
        return FolderImages(root / "train", source=src), FolderImages(root / "val", source=src)
    fmt, where = find_cifar10(path, download=download)
    return _load_cifar_split(fmt, where, "train"), _load_cifar_split(fmt, where, "test")


# ----------------------------------------------------------------------------- CIFAR-10


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


def _describe(d: Path, limit: int = 6) -> str:
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
            f"or a {PICKLE_DIR}/ folder (data_batch_1..5, test_batch), directly or in cifar10/; {_describe(path)}"
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


def _load_cifar_split(fmt: str, where: Path, split: str) -> TensorImages:
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


# ----------------------------------------------------------------------------- ImageFolder trees


def _has_image(d: Path, exts) -> bool:
    """Whether `d` holds at least one image file (searched recursively, as ImageFolder does)."""
    for dirpath, _dirs, files in os.walk(d, followlinks=True):
        if any(f.lower().endswith(exts) for f in files):
            return True
    return False


def _list(items, limit=5) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_split(root: Path, split: str, exts) -> list[str]:
    d = root / split
    class_dirs, loose = [], []
    for entry in os.scandir(d):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            class_dirs.append(entry.name)
        elif entry.name.lower().endswith(exts):
            loose.append(entry.name)
    if not class_dirs:
        if loose:
            raise UserError(
                f"folder:{root}: {split}/ holds {len(loose)} images directly but no class folders; "
                f"ImageFolder needs {split}/<class>/<image> (for ImageNet, sort val/ into its 1000 class folders first)"
            )
        raise UserError(f"folder:{root}: {split}/ has no class folders (expected {split}/<class>/<image>)")
    if loose:
        raise UserError(f"folder:{root}: {split}/ holds {len(loose)} loose images beside its class folders "
                        f"(e.g. {loose[0]}); they would be ignored: move them into class folders")
    empty = [c for c in class_dirs if not _has_image(d / c, exts)]
    if empty:
        raise UserError(f"folder:{root}: {len(empty)} class folder(s) in {split}/ hold no images: {_list(empty)}")
    return sorted(class_dirs)


def check_folder(root: Path) -> Path:
    """Validate an ImageFolder tree root/{train,val}/<class>/<image>; returns the root."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"folder:{root}: no such directory")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise UserError(f"folder:{root}: no {' or '.join(s + '/' for s in missing)} folder "
                        f"(expected train/<class>/<image> and val/<class>/<image>); {_describe(root)}")
    exts = IMG_EXTENSIONS
    train = _check_split(root, "train", exts)
    val = _check_split(root, "val", exts)
    if train != val:
        only_t, only_v = set(train) - set(val), set(val) - set(train)
        parts = []
        if only_t:
            parts.append(f"only in train/: {_list(only_t)}")
        if only_v:
            parts.append(f"only in val/: {_list(only_v)}")
        raise UserError(f"folder:{root}: train/ and val/ hold different classes ({'; '.join(parts)})")
    return root


# ----------------------------------------------------------------------------- subsets


def balanced_indices(dataset, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of a class-balanced draw of `n` items (n // K per class, the remainder to the
    first classes)."""
    labels = dataset.labels
    if n <= 0:
        raise UserError(f"subset size must be positive, got {n}")
    present = torch.unique(labels).tolist()
    k = len(present)
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for j, c in enumerate(present):
        want = n // k + (1 if j < n % k else 0)
        idx = torch.nonzero(labels == c).flatten()
        if want > len(idx):
            name = dataset.classes[c] if c < len(dataset.classes) else c
            raise UserError(f"cannot take a class-balanced subset of {n}: class {name} has only {len(idx)} images")
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:want]])
    return torch.sort(torch.cat(chosen)).values


def subset(dataset, n: int, seed: int = 0):
    """A class-balanced subset of `n` items (n // K per class, the remainder to the first classes)."""
    if n > 0 and n >= len(dataset.labels):
        return dataset
    return dataset.restricted(balanced_indices(dataset, n, seed))  # refuses n <= 0


def validation_split(dataset, n_train: int, n_val: int, seed: int = 0):
    """Two disjoint class-balanced parts of one labelled set: (n_train items, n_val items).

    For choosing recipes and for learning curves on a dataset's *training* images, so that the
    test set is touched only for final numbers. The same (dataset, sizes, seed) gives the same parts."""
    if n_train <= 0 or n_val <= 0:
        raise UserError(f"validation split sizes must be positive, got {n_train} / {n_val}")
    if n_train + n_val > len(dataset.labels):
        raise UserError(f"cannot split {len(dataset.labels)} images into {n_train} train + {n_val} validation")
    val_idx = balanced_indices(dataset, n_val, seed)
    rest = torch.ones(len(dataset.labels), dtype=torch.bool)
    rest[val_idx] = False
    remaining = dataset.restricted(torch.nonzero(rest).flatten())
    return subset(remaining, n_train, seed=seed + 1), dataset.restricted(val_idx)
