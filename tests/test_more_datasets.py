"""CIFAR-100 and STL-10: tiny copies written here in the real on-disk formats, read back exactly (pixels,
labels, names, against torchvision's own readers too), found by the search, downloaded via torchvision's
classes (faked), refused with one line when broken; and TensorImages.resized."""

from __future__ import annotations

import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from monossl.cli import main
from monossl.data.cifar import CIFAR100_CLASSES
from monossl.data.datasets import SPEC_HELP, load_dataset, load_pair, parse_spec, subset
from monossl.data.image_sets import TensorImages
from monossl.data.stl10 import STL10_CLASSES
from monossl.errors import UserError

# a pixel set in an otherwise black image: (image index, channel, row y, column x, value); x != y so
# that a transposed read puts it elsewhere
PIXEL = (1, 2, 5, 20, 77)


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- writers of the real formats


def cifar100_images(n: int) -> np.ndarray:
    """(n, 3, 32, 32) uint8, black except PIXEL and each image's index + 1 at (0, 31, 30)."""
    i, c, y, x, v = PIXEL
    chw = np.zeros((n, 3, 32, 32), np.uint8)
    chw[i, c, y, x] = v
    chw[:, 0, 31, 30] = np.arange(n) + 1
    return chw


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 4, text=str) -> Path:
    """A cifar-100-python folder as torchvision downloads it: train, test, meta. The real files hold
    Python 2 strings, which load as str (torchvision's encoding="latin1") or as bytes (ours,
    encoding="bytes"): `text` picks which of the two the keys and names are written as."""
    def t(s: str):
        return s if text is str else s.encode()

    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = [k % 100 for k in range(n)][::-1]  # 99 first, so label order is not the index order
        batch = {t("filenames"): [t(f"img{k}.png") for k in range(n)], t("batch_label"): t("training batch 1 of 1"),
                 t("fine_labels"): fine, t("coarse_labels"): [k // 5 for k in fine],
                 t("data"): cifar100_images(n).reshape(n, 3072)}
        (d / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {t("fine_label_names"): [t(f"class{k:02d}") for k in range(100)],
            t("coarse_label_names"): [t(f"super{k}") for k in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def stl10_images(n: int) -> np.ndarray:
    i, c, y, x, v = PIXEL
    chw = np.zeros((n, 3, 96, 96), np.uint8)
    chw[i, c, y, x] = v
    chw[:, 0, 90, 3] = np.arange(n) + 1  # each image's index + 1, far from PIXEL
    return chw


def write_stl10(root: Path, n_train: int = 20, n_test: int = 3, names=None) -> Path:
    """An stl10_binary folder: images column-major per channel, labels 1..10 as uint8, class_names.txt."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        stl10_images(n).transpose(0, 1, 3, 2).tofile(d / f"{split}_X.bin")  # (c, y, x) -> stored (c, x, y)
        np.array([k % 10 + 1 for k in range(n)], np.uint8).tofile(d / f"{split}_y.bin")
    (d / "class_names.txt").write_text("\n".join(names or [f"kind{k}" for k in range(10)]) + "\n")
    return d


# ----------------------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("text", [str, bytes])
def test_cifar100_pickles(tmp_path, text):
    d = write_cifar100(tmp_path, text=text)
    for spec in (f"cifar100:{d}", f"cifar100:{tmp_path}"):  # the folder, or the folder holding it
        train, test = load_pair(spec)
        assert isinstance(train, TensorImages) and train.source == f"cifar100:{d}"
        assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
        assert test.images.shape == (4, 3, 32, 32)
        assert train.labels.dtype == torch.int64
        assert train.labels.tolist() == [k % 100 for k in range(200)][::-1]
        assert train.classes == [f"class{k:02d}" for k in range(100)]  # fine_label_names from meta
        i, c, y, x, v = PIXEL
        assert train.images[i, c, y, x] == v and int(train.images[i].sum()) == v + i + 1
        assert train.images[:, 0, 31, 30].tolist() == list(range(1, 201))
    assert len(load_dataset(f"cifar100:{d}", "val")) == 4


def test_cifar100_same_as_torchvision(tmp_path, monkeypatch):
    """torchvision's own reader of the same files (md5 checks skipped: these are not the real files)."""
    write_cifar100(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for train_split, ours in zip((True, False), load_pair(f"cifar100:{tmp_path}")):
        ref = torchvision.datasets.CIFAR100(str(tmp_path), train=train_split)
        assert torch.equal(ours.images, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
        assert ours.labels.tolist() == ref.targets and ours.classes == ref.classes


def test_cifar100_npz_pair_and_label_range(tmp_path):
    x = cifar100_images(6).transpose(0, 2, 3, 1)
    np.savez(tmp_path / "cifar100_train.npz", x=x, y=np.array([0, 99, 5, 5, 7, 1]))
    np.savez(tmp_path / "cifar100_test.npz", x=x[:2], y=np.array([3, 4]))
    train, test = load_pair(f"cifar100:{tmp_path}")
    assert train.images.shape == (6, 3, 32, 32) and len(test) == 2
    assert train.labels.tolist() == [0, 99, 5, 5, 7, 1]
    assert train.classes == list(CIFAR100_CLASSES) and train.classes[:2] == ["apple", "aquarium_fish"]
    i, c, y, xx, v = PIXEL
    assert train.images[i, c, y, xx] == v
    np.savez(tmp_path / "cifar100_test.npz", x=x[:2], y=np.array([3, 100]))
    with pytest.raises(UserError, match=r"cifar100_test.npz: labels must lie in 0\.\.99, found 3\.\.100"):
        load_dataset(f"cifar100:{tmp_path}", "test")


def test_cifar100_broken_files(tmp_path):
    d = write_cifar100(tmp_path)
    (d / "test").unlink()
    with pytest.raises(UserError, match="test is missing") as e:
        load_pair(f"cifar100:{d}")
    assert str(d) in one_line(e)
    (d / "test").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(UserError, match="not a readable CIFAR-100 pickle") as e:
        load_pair(f"cifar100:{d}")
    assert str(d / "test") in one_line(e)
    # a CIFAR-10 folder is not CIFAR-100: the pickles differ in name and keys
    (d / "train").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(UserError, match="expected keys 'data' and 'fine_labels', found data, labels"):
        load_dataset(f"cifar100:{d}", "train")


class _Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_cifar100_pickle_cannot_run_code(tmp_path):
    d = write_cifar100(tmp_path / "data")
    marker = tmp_path / "PWNED"
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": _Hostile(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"not a CIFAR-100 pickle: it would call posix\.system") as e:
        load_pair(f"cifar100:{d}")
    assert str(d / "meta") in one_line(e) and not marker.exists()


# ----------------------------------------------------------------------------- STL-10


def test_stl10_binary(tmp_path):
    d = write_stl10(tmp_path)
    for spec in (f"stl10:{d}", f"stl10:{tmp_path}"):
        train, test = load_pair(spec)
        assert isinstance(train, TensorImages) and train.source == f"stl10:{d}"
        assert train.images.shape == (20, 3, 96, 96) and train.images.dtype == torch.uint8
        assert test.images.shape == (3, 3, 96, 96)
        assert train.labels.dtype == torch.int64
        assert train.labels.tolist() == [k % 10 for k in range(20)]  # 1..10 in the file
        assert train.classes == [f"kind{k}" for k in range(10)]
        i, c, y, x, v = PIXEL
        assert train.images[i, c, y, x] == v and train.images[i, c, x, y] == 0  # a transposed read fails here
        assert train.images[:, 0, 90, 3].tolist() == list(range(1, 21)) and int(train.images[0].sum()) == 1
        img, label = train[1]
        assert img.shape == (3, 96, 96) and img.dtype == torch.float32 and img[c, y, x] == pytest.approx(v / 255)
        assert label == 1
    assert len(load_dataset(f"stl10:{d}", "val")) == 3


def test_stl10_same_as_torchvision(tmp_path, monkeypatch):
    write_stl10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.stl10, "check_integrity", lambda *args, **kwargs: True)
    for split, ours in zip(("train", "test"), load_pair(f"stl10:{tmp_path}")):
        ref = torchvision.datasets.STL10(str(tmp_path), split=split)
        assert torch.equal(ours.images, torch.from_numpy(ref.data))
        assert ours.labels.tolist() == ref.labels.tolist() and ours.classes == ref.classes


def test_stl10_default_names_without_class_file(tmp_path):
    d = write_stl10(tmp_path)
    (d / "class_names.txt").unlink()
    assert load_dataset(f"stl10:{d}", "test").classes == list(STL10_CLASSES)


def test_stl10_broken_files(tmp_path):
    d = write_stl10(tmp_path)
    (d / "test_y.bin").unlink()
    with pytest.raises(UserError, match="test_y.bin is missing") as e:
        load_pair(f"stl10:{d}")
    assert str(d) in one_line(e)
    (d / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(UserError, match="holds 2 labels for the 3 images of test_X.bin") as e:
        load_dataset(f"stl10:{d}", "test")
    assert str(d / "test_y.bin") in one_line(e)
    (d / "test_y.bin").write_bytes(bytes([1, 0, 11]))
    with pytest.raises(UserError, match=r"labels must lie in 1\.\.10, found 0\.\.11"):
        load_dataset(f"stl10:{d}", "test")
    x = d / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-1])  # truncated
    with pytest.raises(UserError, match=r"552959 bytes is not a whole number of 3x96x96 images") as e:
        load_dataset(f"stl10:{d}", "train")
    assert str(x) in one_line(e)


# ----------------------------------------------------------------------------- specs and the search


def test_parse_spec_names_the_new_datasets():
    assert parse_spec("cifar100") == ("cifar100", None)
    assert parse_spec("stl10") == ("stl10", None)
    assert parse_spec("stl10:/x/y") == ("stl10", Path("/x/y"))
    assert parse_spec("cifar100:/d") == ("cifar100", Path("/d"))
    with pytest.raises(UserError, match="names no path; use stl10:PATH"):
        parse_spec("stl10:")
    with pytest.raises(UserError, match="unknown dataset 'stl'") as e:
        parse_spec("stl")
    assert SPEC_HELP in str(e.value) and all(k in SPEC_HELP for k in ("cifar100:PATH", "stl10:PATH", "cifar10"))


def test_search_finds_each_dataset_in_its_subfolder(tmp_path, monkeypatch, no_search):
    root = tmp_path / "data"
    c100 = write_cifar100(root / "cifar100", n_train=3)
    stl = write_stl10(root / "stl10", n_train=2)
    monkeypatch.setenv("MONOSSL_DATA", os.pathsep.join([str(no_search), str(root)]))
    assert load_dataset("cifar100", "train").source == f"cifar100:{c100}"
    assert load_dataset("stl10", "train").source == f"stl10:{stl}"
    with pytest.raises(UserError, match="CIFAR-10 not found"):  # CIFAR-100 is not taken for CIFAR-10
        load_pair("cifar10")


def test_search_cache_dir_and_not_found(tmp_path, no_search):
    with pytest.raises(UserError, match="STL-10 not found") as e:
        load_pair("stl10")
    msg = one_line(e)
    assert str(no_search) in msg and "stl10_binary/" in msg
    assert "--data stl10:PATH" in msg and "MONOSSL_DOWNLOAD=1" in msg
    write_stl10(tmp_path / "home" / ".cache" / "monossl" / "stl10", n_train=2)
    assert len(load_dataset("stl10", "train")) == 2


def test_wrong_directory_and_cli_error(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("x\n")
    with pytest.raises(UserError, match="is not a CIFAR-100 directory: expected cifar100_train.npz") as e:
        load_pair(f"cifar100:{tmp_path}")
    assert "cifar-100-python/" in one_line(e) and "train.csv" in str(e.value)
    rc = main(["probe", "--random", "--arch", "cifar", "--data", f"stl10:{tmp_path}", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not a STL-10 directory" in err[0] and "stl10_binary/" in err[0], err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- download (torchvision faked)


def test_download_uses_torchvision_into_first_root(tmp_path, monkeypatch, no_search):
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setenv("MONOSSL_DATA", os.pathsep.join([str(first), str(second)]))
    calls = []

    class FakeCIFAR100:  # what torchvision's class leaves on disk: root/cifar-100-python/
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            if not (Path(root) / "cifar-100-python").exists():
                write_cifar100(Path(root), n_train=5)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    with pytest.raises(UserError, match="CIFAR-100 not found"):
        load_pair("cifar100")  # not without asking
    assert calls == []
    train, test = load_pair("cifar100", download=True)
    target = first / "cifar100"
    assert calls == [(str(target), True, True), (str(target), False, True)]
    assert train.source == f"cifar100:{target / 'cifar-100-python'}" and len(train) == 5
    load_pair("cifar100", download=True)  # found by the search now: no second download
    assert len(calls) == 2


def test_download_stl10_by_environment_and_its_failure(tmp_path, monkeypatch, no_search):
    monkeypatch.setenv("MONOSSL_DOWNLOAD", "1")
    calls = []

    class FakeSTL10:
        def __init__(self, root, split, download):
            calls.append((split, download))
            if not (Path(root) / "stl10_binary").exists():
                write_stl10(Path(root), n_train=2)

    monkeypatch.setattr(torchvision.datasets, "STL10", FakeSTL10)
    assert len(load_dataset("stl10", "train")) == 2
    assert calls == [("train", True), ("test", True)] and (no_search / "stl10" / "stl10_binary").is_dir()

    class Offline:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore")

    monkeypatch.setattr(torchvision.datasets, "STL10", Offline)
    monkeypatch.setenv("MONOSSL_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(UserError, match="downloading STL-10 into .*elsewhere/stl10 failed: <urlopen error") as e:
        load_pair("stl10")
    one_line(e)


# ----------------------------------------------------------------------------- resized, subset


def test_resized(tmp_path):
    train, _ = load_pair(f"stl10:{write_stl10(tmp_path)}")
    small = train.resized(32)
    assert small.images.shape == (20, 3, 32, 32) and small.images.dtype == torch.uint8
    assert torch.equal(small.labels, train.labels) and small.classes == train.classes
    assert small.source == f"{train.source} (resized to 32x32)" and train.images.shape[-1] == 96
    flat = TensorImages(torch.full((2, 3, 96, 96), 137, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b"])
    assert (flat.resized(32).images == 137).all()  # a constant image stays constant
    stripes = torch.zeros(1, 3, 96, 96, dtype=torch.uint8)
    stripes[..., ::2] = 255  # one-pixel stripes: antialiased, 96 -> 32 averages them to grey, not 0 / 255
    grey = TensorImages(stripes, torch.tensor([0]), ["a"]).resized(32).images
    assert grey.min() >= 100 and grey.max() <= 155
    assert train.resized(96) is train
    with pytest.raises(UserError, match="cannot resize to 0 px"):
        train.resized(0)


def test_subset_of_the_new_datasets(tmp_path):
    stl, _ = load_pair(f"stl10:{write_stl10(tmp_path / 's')}")
    s = subset(stl, 10, seed=0)
    assert isinstance(s, TensorImages) and torch.bincount(s.labels).tolist() == [1] * 10
    assert s.images.shape == (10, 3, 96, 96) and s.classes == stl.classes
    picked = s.images[:, 0, 90, 3].long() - 1  # each image carries its index: the labels went with it
    assert torch.equal(stl.labels[picked], s.labels)
    c100, _ = load_pair(f"cifar100:{write_cifar100(tmp_path / 'c')}")
    a, b = subset(c100, 100, seed=3), subset(c100, 100, seed=4)
    assert torch.bincount(a.labels, minlength=100).tolist() == [1] * 100
    ids_a, ids_b = a.images[:, 0, 31, 30].long() - 1, b.images[:, 0, 31, 30].long() - 1
    assert torch.equal(c100.labels[ids_a], a.labels) and not torch.equal(ids_a, ids_b)
