"""STL-10 on disk: torchvision's `stl10_binary` folder, read as torchvision reads it, and its download.

`stl10_binary` holds train_X.bin / test_X.bin (uint8, 3x96x96 per image, each channel stored
column-major), train_y.bin / test_y.bin (uint8 labels 1..10, one per image; 0..9 here) and
class_names.txt (one name a line). The unlabeled split (unlabeled_X.bin) is not read. Where plain
`stl10` is searched: data/dataset_files.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from monossl.data.dataset_files import Layout, check_arrays, class_names, require_file
from monossl.data.image_sets import TensorImages
from monossl.errors import UserError, first_line

STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
SIDE = 96
FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}


def _fetch_stl10(target: Path) -> None:
    from torchvision.datasets import STL10

    for split in ("train", "test"):
        STL10(str(target), split=split, download=True)


STL10_LAYOUT = Layout("stl10", "STL-10", "stl10_binary", "train_X.bin",
                      "train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt", _fetch_stl10)


def _read_bytes(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read ({first_line(exc)})") from None


def load_stl10_split(kind: str, where: Path, split: str) -> TensorImages:
    """One labelled split ('train' | 'test') of the stl10_binary folder `where` (kind is always
    'torchvision', as dataset_files.find(STL10_LAYOUT) reports it)."""
    x_name, y_name = FILES[split]
    x_path, y_path = require_file(where, x_name, STL10_LAYOUT), require_file(where, y_name, STL10_LAYOUT)
    flat, labels = _read_bytes(x_path), _read_bytes(y_path)
    per_image = 3 * SIDE * SIDE
    if flat.size == 0 or flat.size % per_image:
        raise UserError(f"{x_path}: {flat.size} bytes is not a whole number of 3x{SIDE}x{SIDE} images "
                        f"({per_image} bytes each)")
    # as torchvision: each channel is stored column by column, so (c, x, y) -> (c, y, x)
    chw = flat.reshape(-1, 3, SIDE, SIDE).transpose(0, 1, 3, 2)
    if len(labels) != len(chw):
        raise UserError(f"{y_path}: holds {len(labels)} labels for the {len(chw)} images of {x_name}")
    if labels.min() < 1 or labels.max() > 10:
        raise UserError(f"{y_path}: labels must lie in 1..10, found {labels.min()}..{labels.max()}")
    y = labels.astype(np.int64) - 1
    check_arrays(chw.transpose(0, 2, 3, 1), y, f"{where} ({split})", 10, side=SIDE)
    names = None
    names_file = where / "class_names.txt"
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text(errors="replace").splitlines() if n.strip()]
    images = torch.from_numpy(np.ascontiguousarray(chw))
    return TensorImages(images, torch.from_numpy(y), class_names(names, 10, STL10_CLASSES), f"stl10:{where}")
