"""Labelled datasets for probing and supervised baselines: CIFAR-10, CIFAR-100, STL-10 and ImageFolder trees.

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
    cifar100         CIFAR-100 (the 100 fine labels), searched as cifar10 is (`cifar100/` subfolders).
    cifar100:PATH    CIFAR-100 at PATH: the npz pair `cifar100_train.npz` + `cifar100_test.npz`
                     (as cifar10's, `y` in 0..99), or `cifar-100-python`, torchvision's pickles
                     (train, test, meta), that folder or the folder holding it.
    stl10            STL-10's labelled splits (5,000 train / 8,000 test images of 96x96, 10 classes),
                     searched as cifar10 is (`stl10/` subfolders).
    stl10:PATH       STL-10 at PATH: `stl10_binary`, torchvision's folder (train_X.bin, train_y.bin,
                     test_X.bin, test_y.bin, class_names.txt), that folder or the folder holding it.
    folder:PATH      an ImageFolder tree: PATH/train/<class>/<image> and PATH/val/<class>/<image>;
                     train and val must hold the same classes.

Downloading: when nothing is found for plain `cifar10`, `cifar100` or `stl10` and `download=True` is
passed (or MONOSSL_DOWNLOAD=1 is set), torchvision's `CIFAR10` / `CIFAR100` / `STL10` with
`download=True` fetch the files into `<first $MONOSSL_DATA dir or ~/.cache/monossl>/<name>/`
(e.g. `.../cifar10/cifar-10-batches-py`), where the search finds them next time. The search, the
download and the safe reading are in data/dataset_files.py; the formats in data/cifar.py and
data/stl10.py.

API:

    load_pair(spec, download=False) -> (train, test)
    load_dataset(spec, split, download=False)        split: "train" | "test" ("val" is an alias)
    subset(dataset, n, seed=0)                       class-balanced subset of n items
    parse_spec(spec) -> (kind, path)                 kind: "cifar10" | "cifar100" | "stl10" | "folder"

The named datasets come back as `TensorImages`: the whole split in memory, `.images` uint8
(N, 3, H, W) (H = W = 32 for the CIFARs, 96 for STL-10), `.labels` int64 (N,), `.classes` (names),
`.source` (`<name>:<where it was read>`). As a torch Dataset its item is `(float image (3, H, W) in
[0, 1], label)`, or `(transform(uint8 image), label)` when a transform is set; `resized(side)` gives
a copy at another size (STL-10 for a 32-px trunk). Folders come back as `FolderImages`, a
torchvision `ImageFolder` with `.labels`, `.classes` and `.source` as well; its default transform
gives the float tensor of the whole image, and the probe protocols set their own
(`with_transform`). Both have `with_transform(t)` (a shallow copy with another transform) and
`restricted(indices)` (a copy holding only those items).

Every problem with what is found raises `UserError` with one line naming where and what.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from monossl.data.cifar import CIFAR10, CIFAR100, load_cifar_split
from monossl.data.dataset_files import Layout, describe_dir, find
from monossl.data.image_sets import FolderImages, LabelledImages, TensorImages
from monossl.data.stl10 import STL10_LAYOUT, load_stl10_split
from monossl.errors import UserError

SPLITS = ("train", "test")
# name -> (how it lies on disk, load(kind, where, split) for what dataset_files.find returns)
NAMED: dict[str, tuple[Layout, Callable[[str, Path, str], TensorImages]]] = {
    "cifar10": (CIFAR10.layout, partial(load_cifar_split, CIFAR10)),
    "cifar100": (CIFAR100.layout, partial(load_cifar_split, CIFAR100)),
    "stl10": (STL10_LAYOUT, load_stl10_split),
}
SPEC_HELP = ("cifar10, cifar100 or stl10 (found via $MONOSSL_DATA or ~/.cache/monossl), "
             "cifar10:PATH, cifar100:PATH, stl10:PATH or folder:PATH")


# ----------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """'cifar10' -> ('cifar10', None); 'cifar100:PATH' / 'folder:PATH' -> (kind, Path); likewise stl10."""
    if not spec:
        raise UserError(f"empty dataset; use {SPEC_HELP}")
    kind, sep, rest = spec.partition(":")
    if kind in NAMED and not sep:
        return kind, None
    if (kind in NAMED or kind == "folder") and sep:
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


def load_dataset(spec: str, split: str, download: bool = False) -> LabelledImages:
    """One split ('train' or 'test'; 'val' means test) of the dataset `spec`."""
    split = _norm_split(split)
    kind, path = parse_spec(spec)
    if kind == "folder":
        assert path is not None  # parse_spec refuses a folder without its path
        root = check_folder(path)
        return FolderImages(root / ("train" if split == "train" else "val"), source=f"folder:{root}")
    layout, load = NAMED[kind]
    found, where = find(layout, path, download)
    return load(found, where, split)


def load_pair(spec: str, download: bool = False) -> tuple[LabelledImages, LabelledImages]:
    """(train, test) of the dataset `spec`, validated together (same classes)."""
    kind, path = parse_spec(spec)
    if kind == "folder":
        assert path is not None  # parse_spec refuses a folder without its path
        root = check_folder(path)
        src = f"folder:{root}"
        return FolderImages(root / "train", source=src), FolderImages(root / "val", source=src)
    layout, load = NAMED[kind]
    found, where = find(layout, path, download)
    return load(found, where, "train"), load(found, where, "test")


# ----------------------------------------------------------------------------- ImageFolder trees


def _has_image(d: Path, exts: tuple[str, ...]) -> bool:
    """Whether `d` holds at least one image file (searched recursively, as ImageFolder does)."""
    for _dirpath, _dirs, files in os.walk(d, followlinks=True):
        if any(f.lower().endswith(exts) for f in files):
            return True
    return False


def _list(items: Collection[str], limit: int = 5) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_split(root: Path, split: str, exts: tuple[str, ...]) -> list[str]:
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
                        f"(expected train/<class>/<image> and val/<class>/<image>); {describe_dir(root)}")
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


def balanced_indices(dataset: LabelledImages, n: int, seed: int = 0) -> torch.Tensor:
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


def subset(dataset: LabelledImages, n: int, seed: int = 0) -> LabelledImages:
    """A class-balanced subset of `n` items (n // K per class, the remainder to the first classes)."""
    if n > 0 and n >= len(dataset.labels):
        return dataset
    return dataset.restricted(balanced_indices(dataset, n, seed))  # refuses n <= 0


def validation_split(dataset: LabelledImages, n_train: int, n_val: int,
                     seed: int = 0) -> tuple[LabelledImages, LabelledImages]:
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
