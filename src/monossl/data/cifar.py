"""CIFAR-10 and CIFAR-100 on disk: their two formats, read safely, and their download.

Formats (one family, differing only in names): the npz pair `<name>_train.npz` + `<name>_test.npz`
(`x` uint8 (N, 32, 32, 3) RGB, `y` (N,) class indices: the format of shared/data/cifar10), or the
python pickles torchvision downloads, read with an unpickler that builds nothing but plain data:
`cifar-10-batches-py` (data_batch_1..5, test_batch, batches.meta with `label_names`) and
`cifar-100-python` (train, test, meta with `fine_label_names`; the 100 fine labels are used, the 20
coarse ones ignored). Where plain `cifar10` / `cifar100` are searched: data/dataset_files.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monossl.data.dataset_files import (
    Layout,
    check_arrays,
    class_names,
    read_npz_xy,
    read_pickle,
    require_file,
    to_tensor_images,
)
from monossl.data.image_sets import TensorImages
from monossl.errors import UserError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (  # the fine labels, in label order (alphabetical), as cifar-100-python/meta lists them
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


def _fetch_cifar10(target: Path) -> None:
    from torchvision.datasets import CIFAR10

    for train in (True, False):
        CIFAR10(str(target), train=train, download=True)


def _fetch_cifar100(target: Path) -> None:
    from torchvision.datasets import CIFAR100

    for train in (True, False):
        CIFAR100(str(target), train=train, download=True)


@dataclass(frozen=True)
class CifarFormat:
    """What differs between the CIFAR-10 and CIFAR-100 pickles."""

    layout: Layout
    files: dict  # split -> the pickles holding it
    label_key: str  # the key of the labels in each pickle
    meta: str  # the pickle naming the classes
    names_key: str  # its key
    classes: tuple  # the names when the npz pair is read or the meta pickle is absent


CIFAR10 = CifarFormat(
    Layout("cifar10", "CIFAR-10", "cifar-10-batches-py", "data_batch_1", "data_batch_1..5, test_batch",
           _fetch_cifar10, npz={"train": "cifar10_train.npz", "test": "cifar10_test.npz"}),
    files={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    label_key="labels", meta="batches.meta", names_key="label_names", classes=CIFAR10_CLASSES,
)
CIFAR100 = CifarFormat(
    Layout("cifar100", "CIFAR-100", "cifar-100-python", "train", "train, test, meta",
           _fetch_cifar100, npz={"train": "cifar100_train.npz", "test": "cifar100_test.npz"}),
    files={"train": ["train"], "test": ["test"]},
    label_key="fine_labels", meta="meta", names_key="fine_label_names", classes=CIFAR100_CLASSES,
)


def load_cifar_split(fmt: CifarFormat, kind: str, where: Path, split: str) -> TensorImages:
    """One split ('train' | 'test') of a CIFAR that dataset_files.find(fmt.layout) found as (kind, where)."""
    layout, k = fmt.layout, len(fmt.classes)
    source = f"{layout.name}:{where}"
    if kind == "npz":
        assert layout.npz is not None  # found as an npz pair: the layout has one
        path = where / layout.npz[split]
        x, y = read_npz_xy(path)
        check_arrays(x, y, str(path), k)
        return to_tensor_images(x, y, fmt.classes, source)

    xs, ys = [], []
    for name in fmt.files[split]:
        path = require_file(where, name, layout)
        batch = read_pickle(path, layout.title)
        data, labels = batch.get("data"), batch.get(fmt.label_key)
        if data is None or labels is None:
            raise UserError(f"{path}: expected keys 'data' and '{fmt.label_key}', "
                            f"found {', '.join(map(str, batch)) or 'none'}")
        data = np.asarray(data)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise UserError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # rows of R, G, B planes -> HWC
        ys.append(np.asarray(labels))
    x, y = np.concatenate(xs), np.concatenate(ys)
    check_arrays(x, y, f"{where} ({split})", k)
    meta = where / fmt.meta
    names = read_pickle(meta, layout.title).get(fmt.names_key) if meta.is_file() else None
    return to_tensor_images(x, y, class_names(names, k, fmt.classes), source)
