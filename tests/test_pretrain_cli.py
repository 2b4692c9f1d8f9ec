"""`monossl pretrain` / `probe` / `compare` end to end through the CLI, and their bad-input errors."""

import json

import pytest
import torch

from monossl.cli import main
from monossl.models import load_trunk

from conftest import is_drawn_figure


def _pretrain(out, *extra):
    return main(["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "6",
                 "--batch-size", "8", "--out", str(out), "--quiet", *extra])


def test_tiny_pretrain_and_probe_end_to_end(tmp_path, cifar_subset_dir):
    run = tmp_path / "rot"
    assert _pretrain(run) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "rotnet" and config["total_steps"] == 6 and config["preset"] == "all"
    assert "torch" in config["environment"]
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 6 and 0 <= log[-1]["rotation_acc"] <= 100
    trunk, meta = load_trunk(run)
    assert meta["method"] == "rotnet" and meta["image"] == ["builtin:astronaut"]
    # the checkpoint is plain torch: rebuildable without the training code
    ckpt = torch.load(run / "trunk.pt", weights_only=True)
    assert ckpt["arch"] == "cifar" and "stages.conv1.0.weight" in ckpt["state_dict"]

    assert main(["probe", str(run), "--data", f"cifar10:{cifar_subset_dir}", "--epochs", "2", "--workers", "0"]) == 0
    results = json.loads((run / "probe-cifar" / "results.json").read_text())
    assert list(results["taps"]) == ["conv1", "conv2", "conv3", "conv4"]
    assert all(0 <= t["top1"] <= 100 for t in results["taps"].values())
    assert results["protocol"]["name"] == "cifar"


def test_cli_resume_equals_uninterrupted(tmp_path):
    assert _pretrain(tmp_path / "a") == 0
    assert _pretrain(tmp_path / "b", "--stop-after", "3") == 0
    assert not (tmp_path / "b" / "trunk.pt").exists()
    assert _pretrain(tmp_path / "b", "--resume") == 0
    a = torch.load(tmp_path / "a" / "trunk.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "trunk.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_supervised_needs_labelled_data(tmp_path, capsys, cifar_subset_dir):
    assert main(["pretrain", "--method", "supervised", "--out", str(tmp_path / "s")]) == 2
    assert "needs labelled --data" in capsys.readouterr().err
    assert main(["pretrain", "--method", "supervised", "--data", f"cifar10:{cifar_subset_dir}", "--steps", "3",
                 "--batch-size", "16", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert load_trunk(tmp_path / "s")[1]["data"] == f"cifar10:{cifar_subset_dir}"


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--method", "nope", "--image", "builtin:astronaut", "--out", "{tmp}/x"], "unknown --method"),
    (["pretrain", "--method", "rotnet", "--data", "cifar10:{tmp}/missing", "--out", "{tmp}/x"], "missing"),
    (["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--out", "{tmp}/x", "--resume"],
     "no run to resume"),
    (["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--arch", "vgg", "--out", "{tmp}/x"],
     "unknown --arch"),
    (["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "0", "--out", "{tmp}/x"],
     "must be positive"),
    (["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--patch", "rotation_degrees", "--out",
      "{tmp}/x"], "KEY=VALUE"),
    (["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--device", "tpu", "--out", "{tmp}/x"],
     "--device"),
])
def test_bad_pretrain_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_existing_run_needs_resume_and_other_arch_checkpoint_is_refused(tmp_path, capsys, cifar_subset_dir):
    run = tmp_path / "rot"
    assert _pretrain(run) == 0
    capsys.readouterr()
    assert _pretrain(run) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["probe", str(run), "--arch", "alexnet-big", "--data", f"cifar10:{cifar_subset_dir}"]) == 2
    err = capsys.readouterr().err
    assert "cifar" in err and "alexnet-big" in err and err.count("\n") == 1


@pytest.mark.slow
def test_compare_writes_the_table_and_skips_finished_rows(tmp_path, cifar_subset_dir, capsys):
    argv = ["compare", "--data", f"cifar10:{cifar_subset_dir}", "--out", str(tmp_path / "cmp"), "--steps",
            "4", "--supervised-steps", "4", "--probe-epochs", "1", "--quiet"]
    assert main(argv) == 0
    table = json.loads((tmp_path / "cmp" / "results.json").read_text())["table"]
    assert list(table) == ["random", "image-stats", "image", "data-stats", "full", "supervised"]
    for row in ("image", "full"):
        probe = json.loads((tmp_path / "cmp" / row / "probe-cifar" / "results.json").read_text())
        assert table[row]["conv2"] == probe["taps"]["conv2"]["top1"]
    config = json.loads((tmp_path / "cmp" / "full" / "config.json").read_text())
    assert config["method"] == "simclr" and "image" not in config and config["data"].startswith("cifar10:")
    md = (tmp_path / "cmp" / "table.md").read_text()
    assert f"{probe['taps']['conv2']['top1']:.1f}" in md and "| full data (simclr) |" in md
    assert is_drawn_figure(tmp_path / "cmp" / "table.png") and is_drawn_figure(tmp_path / "cmp" / "filters.png")
    capsys.readouterr()
    assert main(argv) == 0  # rerun: every row is skipped
    assert capsys.readouterr().out.count("done before") == 6
    assert main(argv[:-2] + ["2", "--quiet"]) == 2  # other probe epochs: refused, not mixed into the table
    assert "other settings (probe_epochs)" in capsys.readouterr().err


def test_image_too_small_is_named_and_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "rotnet", "--image", "builtin:coffee", "--arch", "alexnet-big", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "builtin:coffee is 600x400 pixels" in err and "at least 512 pixels" in err and err.count("\n") == 1
    assert not out.exists()


def test_supervised_row_sees_at_least_as_many_samples_as_the_one_image_row():
    from monossl.experiments.compare import supervised_steps

    assert supervised_steps("simclr", None) == 2000  # 1000 steps x 128 images x 2 views / 128
    assert supervised_steps("rotnet", 800) == 1600  # 800 x 64 x 4 rotations / 128
    assert supervised_steps("rotnet", 10) == 500  # never below the supervised default
    assert supervised_steps("simclr", 1001) * 128 >= 1001 * 128 * 2
