"""Where `monossl probe` writes, and what it will not write over: a probe's folder names its data as
well as its protocol (probe-<protocol> on the protocol's own data, probe-<protocol>-<data name> on
any other), and a result made with other settings is replaced only with --overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from monossl.cli import main
from monossl.errors import UserError
from monossl.eval.results import data_name, probe_dir_name
from monossl.models import build_trunk, save_trunk

from conftest import write_imagefolder

# a few seconds: 100 / 50 images, one epoch, small batches
QUICK = ["--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_trunk(run / "trunk.pt", build_trunk("cifar"), {"method": "test"})
    return run


def _result(path):
    return json.loads((path / "results.json").read_text())


def test_folder_names():
    # the protocol's own data keeps the folder every existing run, table and committed result uses
    assert probe_dir_name("cifar", "cifar10") == "probe-cifar"
    assert probe_dir_name("cifar", "cifar10:/data/cifar") == "probe-cifar"
    assert probe_dir_name("resnet-cifar", "cifar10") == "probe-resnet-cifar"
    assert probe_dir_name("asano-max", "folder:/data/imagenet") == "probe-asano-max"
    # any other data is named: its kind, or a folder's own name made safe for a file name
    assert probe_dir_name("cifar", "cifar100") == "probe-cifar-cifar100"
    assert probe_dir_name("cifar", "stl10:/somewhere/stl") == "probe-cifar-stl10"
    assert probe_dir_name("cifar", "folder:/data/my pets/") == "probe-cifar-my_pets"
    assert probe_dir_name("asano-max", "cifar10") == "probe-asano-max-cifar10"
    assert data_name("folder:/data/a:b*c") == "a_b_c"
    with pytest.raises(UserError, match="unknown dataset"):
        probe_dir_name("cifar", "imagenet")


def test_two_datasets_keep_both_results(run, cifar_subset_dir, tmp_path, capsys):
    pets = write_imagefolder(tmp_path / "pets", n_train=8, n_val=4, size=32)
    assert main(["probe", str(run), "--data", f"cifar10:{cifar_subset_dir}", "--subset", "100",
                 "--test-subset", "50", *QUICK]) == 0, capsys.readouterr().err
    assert main(["probe", str(run), "--data", f"folder:{pets}", *QUICK]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in run.glob("probe-*")) == ["probe-cifar", "probe-cifar-pets"]
    cifar, folder = _result(run / "probe-cifar"), _result(run / "probe-cifar-pets")
    assert cifar["dataset"] == f"cifar10:{cifar_subset_dir}"
    assert (cifar["n_train"], cifar["n_test"], cifar["num_classes"]) == (100, 50, 10)
    assert folder["dataset"] == f"folder:{pets}"
    assert (folder["n_train"], folder["n_test"], folder["num_classes"]) == (24, 12, 3)
    assert "data folder:" in (run / "probe-cifar-pets" / "results.md").read_text()


def test_other_settings_refused_unless_overwrite(run, cifar_subset_dir, capsys):
    data = ["--data", f"cifar10:{cifar_subset_dir}", "--test-subset", "50"]
    out = run / "probe-cifar"
    assert main(["probe", str(run), *data, "--subset", "100", *QUICK]) == 0, capsys.readouterr().err
    before = (out / "results.json").read_bytes()
    capsys.readouterr()

    # another subset and another epoch count: one line naming the folder and both settings, nothing written
    rc = main(["probe", str(run), *data, "--subset", "200", *QUICK, "--epochs", "2"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert rc == 2 and len(err) == 1, captured.err
    assert err[0].startswith("monossl: error: ") and str(out) in err[0]
    assert "protocol.epochs" in err[0] and "n_train" in err[0] and "--overwrite" in err[0]
    assert "n_test" not in err[0] and "dataset" not in err[0]
    assert (out / "results.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no stray files either

    # the same settings again: rerun as before (the result is replaced by an identical one)
    assert main(["probe", str(run), *data, "--subset", "100", *QUICK]) == 0, capsys.readouterr().err
    again = _result(out)
    assert again["taps"] == json.loads(before)["taps"]

    # --overwrite replaces it with the new settings' result
    assert main(["probe", str(run), *data, "--subset", "200", *QUICK, "--epochs", "2", "--overwrite"]) == 0
    replaced = _result(out)
    assert replaced["n_train"] == 200 and replaced["protocol"]["epochs"] == 2
    assert [h["epoch"] for h in replaced["history"]] == [1, 2]


def test_random_trunk_out_refuses_another_seed(cifar_subset_dir, tmp_path, capsys):
    out = tmp_path / "random"
    args = ["probe", "--random", "--arch", "cifar", "--data", f"cifar10:{cifar_subset_dir}", "--subset", "100",
            "--test-subset", "50", "--out", str(out), *QUICK]
    assert main(args) == 0, capsys.readouterr().err
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*args, "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(seed)" in err[0]
    assert (out / "results.json").read_bytes() == before
