"""`--probe-every`: per-layer learning curves during pretraining, on a validation split of the
probe dataset's training images; resumed runs continue them; training is unaffected."""

import json

import pytest
import torch

from monossl.cli import main
from monossl.data.datasets import load_dataset, validation_split
from monossl.runs import curve_records, read_jsonl

from conftest import is_drawn_figure


def _pretrain(out, data, *extra):
    return main(["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "6", "--batch-size",
                 "8", "--out", str(out), "--quiet", "--probe-data", f"cifar10:{data}", "--probe-split", "200,100",
                 *extra])


def test_validation_split_is_disjoint_balanced_and_from_train(cifar_subset_dir):
    train = load_dataset(f"cifar10:{cifar_subset_dir}", "train")
    a, b = validation_split(train, 200, 100, seed=0)
    assert len(a) == 200 and len(b) == 100
    assert torch.bincount(b.labels, minlength=10).tolist() == [10] * 10
    def rows(d):
        return {bytes(img.numpy()) for img in d.images}

    assert not rows(a) & rows(b)  # no image in both parts
    assert rows(a) | rows(b) <= rows(train)  # both from the training images
    a2, b2 = validation_split(train, 200, 100, seed=0)
    assert torch.equal(a.images, a2.images) and torch.equal(b.images, b2.images)


@pytest.mark.slow
def test_probe_every_logs_curves_and_a_resumed_run_continues_them(tmp_path, cifar_subset_dir):
    whole = tmp_path / "whole"
    assert _pretrain(whole, cifar_subset_dir, "--probe-every", "3") == 0
    records = curve_records(read_jsonl(whole / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 3, 6]
    for r in records:
        assert set(r["top1"]) == {"conv1", "conv2", "conv3", "conv4"}
        assert all(0 <= v <= 100 for v in r["top1"].values()) and r["seconds"] > 0
    assert records[0]["top1"] != records[-1]["top1"]  # the trunk changed between step 0 and the end
    assert is_drawn_figure(whole / "learning_curves.png")
    config = json.loads((whole / "config.json").read_text())
    assert config["evaluations"]["probe"]["every"] == 3 and config["evaluations"]["probe"]["n_val"] == 100

    part = tmp_path / "part"
    assert _pretrain(part, cifar_subset_dir, "--probe-every", "3", "--stop-after", "4") == 0
    assert [r["step"] for r in curve_records(read_jsonl(part / "metrics.jsonl"))] == [0, 3]
    assert _pretrain(part, cifar_subset_dir, "--probe-every", "3", "--resume") == 0
    resumed = curve_records(read_jsonl(part / "metrics.jsonl"))
    assert [(r["step"], r["top1"]) for r in resumed] == [(r["step"], r["top1"]) for r in records]

    plain = tmp_path / "plain"  # the probes do not disturb training: same weights without them
    assert _pretrain(plain, cifar_subset_dir) == 0
    a = torch.load(whole / "trunk.pt", weights_only=True)["state_dict"]
    b = torch.load(plain / "trunk.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not curve_records(read_jsonl(plain / "metrics.jsonl"))


def test_probe_every_refuses_bad_values(tmp_path, cifar_subset_dir, capsys):
    for extra in (["--probe-every", "0"], ["--probe-every", "2", "--probe-split", "200"],
                  ["--probe-every", "2", "--probe-split", "400,200"]):
        assert _pretrain(tmp_path / "bad", cifar_subset_dir, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("monossl: error:") and err.count("\n") == 1
        assert not (tmp_path / "bad").exists()
