"""The ImageNet-scale path at 224 px, end to end through the CLI, on a generated 10-class ImageFolder
(CIFAR-10 images upsampled to 256 px JPEGs, or coloured shapes when CIFAR-10 is not found):
the AlexNet head at 112 and 224 px, `FolderSource`, pretraining on AlexNet (from an image and from a
folder), ten-crop `asano-max` probes, `monossl finetune`, `monossl reproduce imagenet-finetune`,
and the folder-layout errors of the new commands.

DeepCluster on AlexNet is pretrained only inside the reproduce table: each of its epochs fits a
PCA on 4096-d features (an eigendecomposition of a 4096 x 4096 matrix, 10-30 s on this CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from monossl.cli import main
from monossl.data.batches import FolderSource, dataset_source
from monossl.data.datasets import load_pair
from monossl.errors import UserError
from monossl.models import build_trunk, save_trunk

from conftest import SHARED_CIFAR, is_drawn_figure, write_imagefolder

CLASSES = 10
PER_CLASS = {"train": 64, "val": 10}
SIDE = 256
#: asano-max on alexnet-small (docs/probes.md): values per image fed to each probe
POOLED = {"conv1": 6400, "conv2": 6912, "conv3": 9600, "conv4": 6400, "conv5": 9216}
# the smallest runs that still do everything: 20 probe / fine-tuning images, 10 test images (ten crops each)
SMALL_PROBE = ["--subset", "20", "--test-subset", "10", "--quiet"]


def _cifar_train() -> tuple[np.ndarray, np.ndarray] | None:
    """CIFAR-10 train images (N, 32, 32, 3) and labels from $MONOSSL_DATA (or ../shared), else None."""
    from monossl.data.datasets import load_dataset

    for spec in ("cifar10", f"cifar10:{SHARED_CIFAR}"):
        try:
            d = load_dataset(spec, "train")
        except UserError:
            continue
        return d.images.permute(0, 2, 3, 1).numpy(), d.labels.numpy()
    return None


def _shapes(n: int, label: int, rng: np.random.Generator) -> np.ndarray:
    """n 32x32 images of class `label`: a class colour and shape (disc, square, bars) on noise."""
    yy, xx = np.mgrid[:32, :32]
    colour = np.array([(label * 70) % 256, (label * 130 + 60) % 256, (label * 190 + 120) % 256])
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        cy, cx, r = rng.integers(10, 22), rng.integers(10, 22), rng.integers(5, 10)
        mask = [(yy - cy) ** 2 + (xx - cx) ** 2 < r * r, (abs(yy - cy) < r) & (abs(xx - cx) < r),
                (yy // 4) % 2 == 0, (xx // 4) % 2 == 0, (yy + xx) // 4 % 2 == 0][label % 5]
        img = rng.integers(0, 80, size=(32, 32, 3)) + (label >= 5) * 100
        img[mask] = colour
        out[i] = np.clip(img, 0, 255)
    return out


@pytest.fixture(scope="session")
def imagenet_like(tmp_path_factory) -> Path:
    """train/ (64 per class) and val/ (10 per class) of 10 classes, 256x256 JPEGs."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet-like")
    rng = np.random.default_rng(0)
    cifar = _cifar_train()
    for split, n in PER_CLASS.items():
        for c in range(CLASSES):
            if cifar is not None:
                x, y = cifar
                images = x[rng.choice(np.flatnonzero(y == c), n, replace=False)]
            else:
                images = _shapes(n, c, rng)
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i, img in enumerate(images):
                Image.fromarray(img).resize((SIDE, SIDE), Image.BICUBIC).save(d / f"{i:03d}.jpg", quality=90)
    (root / ("CIFAR10" if cifar is not None else "SYNTHETIC")).write_text("")  # where the images came from
    return root


# ----------------------------------------------------------------------------- units


def test_alexnet_head_is_unchanged_at_224_and_takes_112():
    torch.manual_seed(0)
    trunk = build_trunk("alexnet-small").eval()
    assert isinstance(trunk.head[0], nn.AdaptiveMaxPool2d)
    plain = copy.deepcopy(trunk)
    plain.head[0] = nn.MaxPool2d(3, 2)  # AlexNet's own pooling before the FC layers
    x = torch.rand(3, 3, 224, 224)
    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert torch.equal(trunk(x.contiguous(memory_format=fmt)), plain(x.contiguous(memory_format=fmt)))
        taps = trunk.taps(torch.rand(2, 3, 112, 112))
        assert taps["conv5"].shape == (2, 256, 6, 6) and trunk(torch.rand(2, 3, 112, 112)).shape == (2, 4096)
    assert trunk.input_size == 224 and "head.3.weight" in trunk.state_dict()  # checkpoints keep their keys


def test_folder_source_reads_deterministic_centre_squares(tmp_path):
    from PIL import Image

    root = write_imagefolder(tmp_path / "f", n_train=3, n_val=1, size=40)
    # a wide image: thirds red | green | blue; its short side goes to 32 (-> 48x32), the centre 32 columns are
    # the original columns 12..48: red at the left edge, green in the middle, blue at the right edge
    wide = np.zeros((40, 60, 3), dtype=np.uint8)
    wide[:, :20, 0], wide[:, 20:40, 1], wide[:, 40:, 2] = 255, 255, 255
    Image.fromarray(wide).save(root / "train" / "red" / "red_0.png")
    train, _ = load_pair(f"folder:{root}")
    source = dataset_source(train, labelled=True, size=32, seed=1)
    assert isinstance(source, FolderSource) and source.length == 9
    idx = torch.tensor([train.samples.index((str(root / "train" / "red" / "red_0.png"), 2)), 0, 8])
    batch = source.fetch(idx)
    assert batch["images"].shape == (3, 3, 32, 32) and batch["images"].dtype == torch.float32
    assert batch["labels"].tolist() == [train.targets[i] for i in idx.tolist()] and torch.equal(batch["index"], idx)
    img = batch["images"][0]
    assert img[:, 16, 1].argmax() == 0 and img[:, 16, 16].argmax() == 1 and img[:, 16, 30].argmax() == 2
    assert img[0, :, 1].min() > 0.95 and img[2, :, 30].min() > 0.95  # pure colours: no black borders
    # the same tensor for the same indices, with one thread or several
    one = FolderSource(train, 32, labelled=True, seed=1, threads=1).fetch(idx)
    assert torch.equal(one["images"], batch["images"]) and torch.equal(source.fetch(idx)["images"], batch["images"])
    assert torch.equal(source.order(3), source.order(3)) and sorted(source.order(3).tolist()) == list(range(9))
    assert source.describe() == {"kind": "image-folder", "root": str(root / "train"), "length": 9, "labelled": True,
                                 "size": 32}
    (root / "train" / "blue" / "blue_0.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"blue_0.png: not a readable image"):
        source.fetch(torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- end to end, 224 px


@pytest.fixture(scope="module")
def rotnet_run(tmp_path_factory) -> Path:
    """RotNet on alexnet-small from the default image: 256-px patches, random-resized crop 224."""
    run = tmp_path_factory.mktemp("alex") / "rotnet"
    assert main(["pretrain", "--method", "rotnet", "--arch", "alexnet-small", "--image", "builtin:astronaut",
                 "--steps", "2", "--batch-size", "2", "--out", str(run), "--quiet"]) == 0
    return run


@pytest.mark.slow
def test_pretrain_alexnet_from_an_image_and_from_a_folder(tmp_path, rotnet_run, imagenet_like):
    config = json.loads((rotnet_run / "config.json").read_text())
    assert config["arch"] == "alexnet-small" and config["patch_config"]["size"] == 256
    assert config["source"]["kind"] == "patch-stream" and (rotnet_run / "trunk.pt").exists()

    bigan = tmp_path / "bigan"
    assert main(["pretrain", "--method", "bigan", "--arch", "alexnet-small", "--image", "builtin:astronaut",
                 "--steps", "2", "--batch-size", "2", "--out", str(bigan), "--quiet"]) == 0
    mc = json.loads((bigan / "config.json").read_text())["method_config"]
    assert mc["encoder_size"] == 112 and mc["image_size"] == 64
    assert [p.name for p in (bigan / "samples").iterdir()] == ["step000002.png"]

    # the "1M images" path: RotNet on the folder's training images, labels unused
    full = tmp_path / "rotnet-folder"
    assert main(["pretrain", "--method", "rotnet", "--arch", "alexnet-small", "--data", f"folder:{imagenet_like}",
                 "--steps", "2", "--batch-size", "2", "--out", str(full), "--quiet"]) == 0
    config = json.loads((full / "config.json").read_text())
    assert config["source"] == {"kind": "image-folder", "root": str(imagenet_like / "train"), "length": 640,
                                "labelled": False, "size": 256}
    log = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"])


@pytest.mark.slow
def test_finetune_at_224_keeps_conv1_conv2(tmp_path, rotnet_run, imagenet_like):
    out = tmp_path / "ft"
    assert main(["finetune", str(rotnet_run), "--freeze", "conv1,conv2", "--data", f"folder:{imagenet_like}",
                 "--steps", "1", "--batch-size", "2", "--probe-epochs", "1", "--workers", "0", "--out", str(out),
                 *SMALL_PROBE]) == 0
    before = torch.load(rotnet_run / "trunk.pt", weights_only=True)["state_dict"]
    after = torch.load(out / "trunk.pt", weights_only=True)["state_dict"]
    for k in before:
        if k.startswith(("stages.conv1.", "stages.conv2.")):
            assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["stages.conv5.0.weight"], after["stages.conv5.0.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["source"]["kind"] == "image-folder" and config["source"]["size"] == 256
    result = json.loads((out / "probe-asano-max" / "results.json").read_text())
    assert {k: v["pooled_size"] for k, v in result["taps"].items()} == POOLED and result["n_test"] == 10


@pytest.fixture(scope="module")
def table(tmp_path_factory, imagenet_like) -> Path:
    """`monossl reproduce imagenet-finetune --budget smoke`, shrunk: 1 step per training, batches of 2."""
    out = tmp_path_factory.mktemp("table") / "t4"
    assert main(["reproduce", "imagenet-finetune", "--budget", "smoke", "--arch", "alexnet-small", "--data",
                 f"folder:{imagenet_like}", "--out", str(out), "--steps", "1", "--finetune-steps", "1",
                 "--batch-size", "2", *SMALL_PROBE]) == 0
    return out


@pytest.mark.slow
def test_reproduce_imagenet_finetune_smoke(table, imagenet_like, capsys):
    from monossl.experiments.finetune_table import ROWS, TAPS
    from monossl.paper import IMAGENET_FINETUNE as PAPER_TABLE4

    results = json.loads((table / "results.json").read_text())
    assert list(results["table"]) == list(ROWS) == ["supervised", "bigan", "rotnet", "deepcluster"]
    for row, cells in results["table"].items():
        paper = PAPER_TABLE4[results["paper_rows"][row]]
        assert list(cells) == list(TAPS)
        for tap, cell in cells.items():
            assert 0 <= cell["ours"] <= 100 and cell["paper"] == paper[tap]
            assert cell["diff"] == pytest.approx(cell["ours"] - cell["paper"], abs=0.01)
        assert {k: v["pooled_size"] for k, v in results["rows"][row]["taps"].items()} == POOLED
    assert results["paper_rows"]["rotnet"] == "RotNet, image A" and results["table"]["rotnet"]["conv5"]["paper"] == 51.8
    config = results["config"]
    assert config["protocol"]["name"] == "asano-max" and config["protocol"]["test_crops"] == 10
    assert config["finetune"]["freeze"] == ["conv1", "conv2"]
    assert config["seed"] == 0 and config["arch"] == "alexnet-small"
    assert "torch" in results["environment"]

    # each row: pretrained as asked, then fine-tuned from it with conv1/conv2 (and their statistics) kept
    sources = {"supervised": "image-folder", "bigan": "patch-stream", "rotnet": "patch-stream",
               "deepcluster": "patch-stream"}
    for row in ROWS:
        pre = json.loads((table / row / "config.json").read_text())
        assert pre["method"] == row and pre["arch"] == "alexnet-small" and pre["total_steps"] == 1
        assert pre["source"]["kind"] == sources[row]
        a = torch.load(table / row / "trunk.pt", weights_only=True)["state_dict"]
        b = torch.load(table / row / "finetune-conv1-conv2" / "trunk.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("stages.conv1.", "stages.conv2.")))
        assert not torch.equal(a["stages.conv3.1.0.weight"], b["stages.conv3.1.0.weight"])
    assert json.loads((table / "deepcluster" / "config.json").read_text())["source"]["length"] == 16
    assert json.loads((table / "bigan" / "config.json").read_text())["method_config"]["encoder_size"] == 112

    rows = (table / "table.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 5 and all(r.endswith(",done") for r in rows[1:])
    md = (table / "table.md").read_text()
    assert md.count("\n| ") == 5 and "[paper: DeepCluster, image A]" in md and "not ImageNet's 1000" in md
    assert is_drawn_figure(table / "table.png")

    # a rerun trains and probes nothing; other settings for the same --out are refused
    capsys.readouterr()
    args = ["reproduce", "imagenet-finetune", "--budget", "smoke", "--arch", "alexnet-small", "--data",
            f"folder:{imagenet_like}", "--out", str(table), "--steps", "1", "--batch-size", "2", *SMALL_PROBE]
    stamp = (table / "rotnet" / "finetune-conv1-conv2" / "trunk.pt").stat().st_mtime_ns
    assert main(args + ["--finetune-steps", "1"]) == 0
    assert capsys.readouterr().out.count("done before") == 4
    assert (table / "rotnet" / "finetune-conv1-conv2" / "trunk.pt").stat().st_mtime_ns == stamp
    assert main(args + ["--finetune-steps", "2"]) == 2
    assert "other settings (finetune.steps)" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_asano_max_uses_ten_crops(table, imagenet_like, tmp_path, monkeypatch):
    from monossl.eval import linear_probes

    seen = []
    real = linear_probes.average_crop_logits

    def counting(logits, n_crops):
        seen.append((logits.shape[0], n_crops))
        return real(logits, n_crops)

    monkeypatch.setattr(linear_probes, "average_crop_logits", counting)
    out = tmp_path / "probe"
    assert main(["probe", str(table / "supervised"), "--data", f"folder:{imagenet_like}", "--protocol", "asano-max",
                 "--epochs", "1", "--subset", "20", "--test-subset", "10", "--workers", "0", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert {k: v["pooled_size"] for k, v in result["taps"].items()} == POOLED
    assert result["taps"]["conv1"]["shape"] == [64, 55, 55] and result["taps"]["conv1"]["pooled_shape"] == [64, 10, 10]
    assert result["protocol"]["test_crops"] == 10 and result["protocol"]["test_resize"] == 256
    # every test image's ten crops went through the trunk and their logits were averaged
    assert seen and all(n == 10 and rows % 10 == 0 for rows, n in seen)
    assert sum(rows for rows, _ in seen) == 10 * 10 * len(POOLED)  # 10 images x 10 crops, for each tap


# ----------------------------------------------------------------------------- folder layout errors


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: ") and err.count("\n") == 1
    return err


def test_bad_folders_and_data_are_refused_by_the_new_commands(tmp_path, capsys):
    unsplit = write_imagefolder(tmp_path / "unsplit")
    for c in ("red", "green", "blue"):  # val/ as ImageNet ships it: every image loose
        for f in (unsplit / "val" / c).iterdir():
            f.rename(unsplit / "val" / f.name)
        (unsplit / "val" / c).rmdir()
    err = _error(capsys, ["pretrain", "--method", "supervised", "--arch", "alexnet-small", "--data",
                          f"folder:{unsplit}", "--out", str(tmp_path / "run")])
    assert "val/ holds 6 images directly but no class folders" in err and not (tmp_path / "run").exists()

    mismatched = write_imagefolder(tmp_path / "mismatched")
    (mismatched / "val" / "green").rename(mismatched / "val" / "purple")
    save_trunk(tmp_path / "random.pt", build_trunk("alexnet-small"), {"method": "random"})
    err = _error(capsys, ["finetune", str(tmp_path / "random.pt"), "--data", f"folder:{mismatched}",
                          "--out", str(tmp_path / "ft")])
    assert "train/ and val/ hold different classes (only in train/: green; only in val/: purple)" in err
    assert not (tmp_path / "ft").exists()

    for data, message in ((["--data", "cifar10"], "needs an ImageNet-style folder:PATH"),
                          ([], "needs --data folder:PATH")):
        err = _error(capsys, ["reproduce", "imagenet-finetune", *data, "--out", str(tmp_path / "t")])
        assert message in err
    err = _error(capsys, ["reproduce", "imagenet-finetune", "--budget", "quick", "--data", f"folder:{mismatched}"])
    assert "imagenet-finetune has budgets smoke, paper" in err
    err = _error(capsys, ["reproduce", "cifar10-augmentations", "--arch", "alexnet-big"])
    assert "--arch applies to imagenet-finetune only" in err
