"""Shared fixtures (a small CIFAR-10 subset in the npz format, a tiny ImageFolder tree) and the two lanes.

Lanes: tests marked `slow` (end-to-end runs of several seconds) run after all the others, and are
skipped when a fast test has failed, so a broken change fails CI in the fast lane's minutes.
`pytest -m "not slow"` runs the fast lane alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

_FAST_LANE_FAILURES = []


def pytest_collection_modifyitems(config, items):
    """The fast lane first: slow tests move to the end (a stable sort keeps each lane's order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def pytest_runtest_setup(item):
    if item.get_closest_marker("slow") is not None and _FAST_LANE_FAILURES:
        pytest.skip(f"the fast lane failed ({_FAST_LANE_FAILURES[0]}): slow tests not run")


def pytest_runtest_logreport(report):
    if report.failed and "slow" not in report.keywords:
        _FAST_LANE_FAILURES.append(report.nodeid)


SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def _balanced(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in range(10)]
    return np.sort(np.concatenate(idx))


def synthetic_cifar(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent 32x32 images (a class colour plus a class-dependent stripe, and noise)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    rng.shuffle(y)
    # the class colours must not depend on `seed`: train and test sets are made with different seeds
    colours = np.random.default_rng(12345).integers(30, 226, size=(10, 3))
    x = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i, c in enumerate(y):
        img = np.tile(colours[c], (32, 32, 1)).astype(np.int16)
        img[(c * 3) % 29:(c * 3) % 29 + 4] = 255 - img[(c * 3) % 29:(c * 3) % 29 + 4]
        img += rng.integers(-25, 26, size=img.shape, dtype=np.int16)
        x[i] = np.clip(img, 0, 255)
    return x, y.astype(np.uint8)


@pytest.fixture
def no_search(tmp_path, monkeypatch):
    """$MONOSSL_DATA and ~ pointing at empty places, downloads off: nothing real is found."""
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    monkeypatch.setenv("MONOSSL_DATA", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MONOSSL_DOWNLOAD", raising=False)
    return empty


@pytest.fixture(scope="session")
def cifar_subset_dir(tmp_path_factory) -> Path:
    """A directory with cifar10_train.npz (500 images) and cifar10_test.npz (200), class-balanced,
    taken from the real CIFAR-10 in ../shared/data/cifar10 when present, else synthetic.
    A marker file, REAL or SYNTHETIC, says which."""
    out = tmp_path_factory.mktemp("cifar10-subset")
    rng = np.random.default_rng(0)
    if (SHARED_CIFAR / "cifar10_train.npz").is_file() and (SHARED_CIFAR / "cifar10_test.npz").is_file():
        for split, per_class in (("train", 50), ("test", 20)):
            with np.load(SHARED_CIFAR / f"cifar10_{split}.npz") as d:
                x, y = d["x"], d["y"]
            idx = _balanced(y, per_class, rng)
            np.savez(out / f"cifar10_{split}.npz", x=x[idx], y=y[idx])
        (out / "REAL").write_text("")
    else:
        for split, n, seed in (("train", 500, 1), ("test", 200, 2)):
            x, y = synthetic_cifar(n, seed)
            np.savez(out / f"cifar10_{split}.npz", x=x, y=y)
        (out / "SYNTHETIC").write_text("")
    return out


def write_imagefolder(root: Path, classes=("red", "green", "blue"), n_train: int = 4, n_val: int = 2,
                      size: int = 40, seed: int = 0) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png, each class a noisy colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for split, n in (("train", n_train), ("val", n_val)):
        for j, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            colour = np.array(base.get(c, ((j * 80) % 256, (j * 140) % 256, (j * 200) % 256)))
            for i in range(n):
                img = np.clip(colour + rng.integers(-20, 21, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{c}_{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A folder:PATH tree: train/ (4 per class) and val/ (2 per class), 3 colour classes, 40x40 PNGs."""
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))


def is_drawn_figure(path, min_side: int = 200, min_colours: int = 8) -> bool:
    """Whether `path` is a PNG with something drawn in it: large, and more than a few colours
    (an empty or blank figure fails; a file checked only by its size or magic bytes would not)."""
    from PIL import Image

    with Image.open(path) as png:
        return png.format == "PNG" and min(png.size) >= min_side and \
            len(png.convert("RGB").getcolors(1 << 22) or ()) > min_colours


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is several times faster than two on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 3-step RotNet run on the built-in astronaut (trunk.pt + config.json; conv1 whitened, the
    CIFAR trunk's default)."""
    from monossl.cli import main

    out = tmp_path_factory.mktemp("viz") / "rotnet"
    assert main(["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "3",
                 "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
    return out
