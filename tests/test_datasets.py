"""Labelled datasets: CIFAR-10 (npz, python pickles, search), ImageFolder trees, validation, subsets."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch

from monossl.cli import main
from monossl.data.cifar import CIFAR10_CLASSES
from monossl.data.datasets import load_dataset, load_pair, parse_spec, subset
from monossl.data.image_sets import FolderImages, TensorImages
from monossl.errors import UserError

from conftest import write_imagefolder


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit code 2 and a one-line error; return the line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monossl: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- CIFAR-10


def test_npz_pair(cifar_subset_dir):
    train, test = load_pair(f"cifar10:{cifar_subset_dir}")
    assert isinstance(train, TensorImages)
    assert train.images.shape == (500, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (200, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [50] * 10
    assert train.classes == list(CIFAR10_CLASSES)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == int(train.labels[0])
    # HWC on disk -> CHW in memory
    with np.load(cifar_subset_dir / "cifar10_train.npz") as d:
        assert torch.equal(train.images[3].permute(1, 2, 0), torch.from_numpy(d["x"][3]))
    assert len(load_dataset(f"cifar10:{cifar_subset_dir}", "val")) == 200


def write_pickles(root, per_batch=4, n_test=3):
    """A tiny cifar-10-batches-py folder; returns (train x HWC, train y)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": chw.reshape(n, 3072), b"labels": labels}, f)
        if name != "test_batch":
            xs.append(chw.transpose(0, 2, 3, 1))
            ys += labels
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}, f)
    return d, np.concatenate(xs), np.array(ys)


def test_pickle_batches(tmp_path):
    d, x, y = write_pickles(tmp_path)
    for spec in (f"cifar10:{d}", f"cifar10:{tmp_path}"):  # the batches folder, or the folder holding it
        train, test = load_pair(spec)
        assert train.images.shape == (20, 3, 32, 32) and len(test) == 3
        assert torch.equal(train.images.permute(0, 2, 3, 1), torch.from_numpy(x))
        assert train.labels.tolist() == y.tolist()
        assert train.classes == list(CIFAR10_CLASSES)


def test_pickle_missing_batch(tmp_path):
    d, _, _ = write_pickles(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 is missing"):
        load_pair(f"cifar10:{d}")


def test_search_monossl_data(cifar_subset_dir, tmp_path, monkeypatch, no_search):
    root = tmp_path / "data"
    shutil.copytree(cifar_subset_dir, root / "cifar10")  # found in the cifar10/ subfolder
    monkeypatch.setenv("MONOSSL_DATA", str(root))
    train, test = load_pair("cifar10")
    assert len(train) == 500 and len(test) == 200
    assert str(root / "cifar10") in train.source


def test_search_cache_dir(tmp_path, no_search):
    write_pickles(tmp_path / "home" / ".cache" / "monossl" / "cifar10")
    train, _ = load_pair("cifar10")
    assert len(train) == 20


def test_missing_dataset_cli(capsys, tmp_path, no_search):
    line = cli_error(capsys, ["probe", "--random", "--arch", "cifar", "--data", "cifar10",
                              "--out", str(tmp_path / "o")])
    assert "CIFAR-10 not found" in line and str(no_search) in line and "MONOSSL_DATA" in line
    assert "cifar10:PATH" in line
    line = cli_error(capsys, ["probe", "--random", "--out", str(tmp_path / "o"), "--data", f"cifar10:{tmp_path}/nope"])
    assert "no such directory" in line


def test_wrong_layout_cli(capsys, tmp_path):
    (tmp_path / "train.csv").write_text("x\n")
    line = cli_error(capsys, ["probe", "--random", "--out", str(tmp_path / "o"), "--data", f"cifar10:{tmp_path}"])
    assert "not a CIFAR-10 directory" in line and "cifar10_train.npz" in line and "train.csv" in line


def test_half_npz_pair(cifar_subset_dir, tmp_path):
    shutil.copy(cifar_subset_dir / "cifar10_train.npz", tmp_path)
    with pytest.raises(UserError, match="has cifar10_train.npz but not cifar10_test.npz"):
        load_pair(f"cifar10:{tmp_path}")


@pytest.mark.parametrize("x, y, message", [
    (np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.uint8), "must be uint8"),
    (np.zeros((4, 3, 32, 32), np.uint8), np.zeros(4, np.uint8), r"shape \(N, 32, 32, 3\)"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(5, np.uint8), "expected 4 labels"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 1, 10, 2], np.uint8), r"0\.\.9, found 0\.\.10"),
])
def test_bad_arrays(tmp_path, x, y, message):
    for split in ("train", "test"):
        np.savez(tmp_path / f"cifar10_{split}.npz", x=x, y=y)
    with pytest.raises(UserError, match=message):
        load_pair(f"cifar10:{tmp_path}")


def test_npz_wrong_keys_and_corrupt(tmp_path):
    np.savez(tmp_path / "cifar10_train.npz", images=np.zeros((1, 32, 32, 3), np.uint8))
    (tmp_path / "cifar10_test.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="expected arrays 'x' and 'y', found images"):
        load_dataset(f"cifar10:{tmp_path}", "train")
    with pytest.raises(UserError, match="not a readable npz"):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_parse_spec():
    assert parse_spec("cifar10") == ("cifar10", None)
    assert parse_spec("folder:/x")[0] == "folder"
    for bad, msg in (("imagenet", "unknown dataset"), ("folder", "needs a path"), ("cifar10:", "names no path")):
        with pytest.raises(UserError, match=msg):
            parse_spec(bad)


# ----------------------------------------------------------------------------- ImageFolder


def test_imagefolder(tiny_imagefolder):
    train, val = load_pair(f"folder:{tiny_imagefolder}")
    assert isinstance(train, FolderImages)
    assert train.classes == val.classes == ["blue", "green", "red"]
    assert len(train) == 12 and len(val) == 6
    x, y = train[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and x.max() <= 1
    assert train.labels.tolist() == sorted(train.labels.tolist())
    sub = train.restricted([0, 5])
    assert len(sub) == 2 and sub.labels.tolist() == [train.labels[0].item(), train.labels[5].item()]
    assert len(load_dataset(f"folder:{tiny_imagefolder}", "val")) == 6


def test_unsplit_val_cli(capsys, tmp_path):
    root = write_imagefolder(tmp_path / "inet")
    for c in ("red", "green", "blue"):  # the ImageNet val/ as downloaded: all images loose
        for f in (root / "val" / c).iterdir():
            f.rename(root / "val" / f.name)
        (root / "val" / c).rmdir()
    line = cli_error(capsys, ["probe", "--random", "--out", str(tmp_path / "o"), "--data", f"folder:{root}"])
    assert "val/ holds 6 images directly but no class folders" in line


def test_loose_images_beside_classes(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    shutil.copy(next((root / "train" / "red").iterdir()), root / "train" / "stray.png")
    with pytest.raises(UserError, match="1 loose images beside its class folders"):
        load_pair(f"folder:{root}")


def test_empty_class_folder(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    (root / "train" / "purple").mkdir()
    (root / "val" / "purple").mkdir()
    (root / "val" / "purple" / "notes.txt").write_text("no images")
    with pytest.raises(UserError, match=r"class folder\(s\) in train/ hold no images: purple"):
        load_pair(f"folder:{root}")


def test_class_sets_differ(tmp_path):
    root = write_imagefolder(tmp_path / "f")
    shutil.rmtree(root / "val" / "green")
    with pytest.raises(UserError, match="different classes.*only in train/: green"):
        load_pair(f"folder:{root}")


def test_folder_layout_errors(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_pair(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="no val/ folder"):
        load_pair(f"folder:{tmp_path}")
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="train/ has no class folders"):
        load_pair(f"folder:{tmp_path}")


# ----------------------------------------------------------------------------- subsets


def test_subset_balanced_and_deterministic(cifar_subset_dir):
    train, _ = load_pair(f"cifar10:{cifar_subset_dir}")
    a, b, c = subset(train, 103, seed=1), subset(train, 103, seed=1), subset(train, 103, seed=2)
    assert len(a) == 103
    assert sorted(torch.bincount(a.labels).tolist()) == [10] * 7 + [11] * 3
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert subset(train, 10_000) is train
    with pytest.raises(UserError, match="class-balanced subset"):
        subset(train.restricted(torch.arange(0, 500, 7)), 60)


def test_subset_folder(tiny_imagefolder):
    train, _ = load_pair(f"folder:{tiny_imagefolder}")
    s = subset(train, 6, seed=0)
    assert isinstance(s, FolderImages) and torch.bincount(s.labels).tolist() == [2, 2, 2]
