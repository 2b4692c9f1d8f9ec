"""`monossl reproduce cifar10-augmentations`: a complete table from a tiny run, reruns skip finished
rows and resume unfinished ones, other settings are refused, stopped rows are reported, findings."""

import csv
import json

import pytest
import torch

from monossl import cli
from monossl.errors import TrainingStopped, UserError
from monossl.experiments import augmentations
from monossl.experiments.table import ReproduceConfig
from monossl.paper import CIFAR10_BIGAN, cifar10_row

from conftest import is_drawn_figure

# tiny settings: the smoke budget shrunk further (the smoke budget itself is run by hand, see docs/bigan.md)
TINY = ["--steps", "2", "--batch-size", "8", "--probe-epochs", "1", "--subset", "100", "--test-subset", "50",
        "--widths", "8,8,16,16", "--quiet"]


def _reproduce(out, data_dir, *extra):
    return cli.main(["reproduce", "cifar10-augmentations", "--method", "bigan", "--budget", "smoke",
                     "--data", f"cifar10:{data_dir}", "--out", str(out), *TINY, *extra])


@pytest.mark.slow
def test_smoke_table_is_complete_and_a_rerun_skips_finished_rows(tmp_path, cifar_subset_dir, capsys):
    out = tmp_path / "rep"
    assert _reproduce(out, cifar_subset_dir) == 0
    for row in augmentations.ROWS:
        assert (out / row / "trunk.pt").exists() and (out / row / "probe-cifar" / "results.json").exists(), row
    for row in augmentations.PRESET_ROWS:
        config = json.loads((out / row / "config.json").read_text())
        assert config["method"] == "bigan" and config["preset"] == row and config["total_steps"] == 2

    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == list(augmentations.ROWS)
    for row, cells in results["table"].items():
        paper = CIFAR10_BIGAN[results["paper_rows"][row]]
        assert list(cells) == ["conv1", "conv2", "conv3", "conv4"]
        for tap, cell in cells.items():
            assert 0 <= cell["ours"] <= 100 and cell["paper"] == paper[tap]
            assert cell["diff"] == pytest.approx(cell["ours"] - cell["paper"], abs=0.01)
    assert results["paper_rows"]["none"] == "No aug." and results["paper_rows"]["random"] == "Random features"
    ours = {row: {tap: cell["ours"] for tap, cell in cells.items()} for row, cells in results["table"].items()}
    assert results["findings"] == augmentations.findings(ours)  # checked on the table's own numbers
    assert len(results["findings"]) == 5 and all(isinstance(f["holds"], bool) for f in results["findings"])
    assert all(f["holds"] for f in results["paper_findings"])

    with open(out / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["status"] for r in rows} == {"done"}
    md = (out / "table.md").read_text()
    assert md.count("\n| ") == 11 and "[paper: All]" in md and "The paper's findings in our numbers" in md
    assert is_drawn_figure(out / "table.png")

    # the report command reads the table with our paper numbers
    from monossl.viz.report import table_from_results

    t = table_from_results(results, "results.json")
    assert t.paper["all"]["conv1"] == 68.1

    # a rerun trains and probes nothing
    capsys.readouterr()
    stamp = {row: (out / row / "probe-cifar" / "results.json").stat().st_mtime_ns for row in augmentations.ROWS}
    assert _reproduce(out, cifar_subset_dir) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == 10
    assert stamp == {row: (out / row / "probe-cifar" / "results.json").stat().st_mtime_ns for row in augmentations.ROWS}

    # other settings for the same --out are refused
    assert cli.main(["reproduce", "cifar10-augmentations", "--method", "bigan", "--data", f"cifar10:{cifar_subset_dir}",
                     "--out", str(out), *TINY, "--steps", "3"]) == 2
    assert "other settings (steps.bigan, steps.supervised)" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_row_is_resumed(tmp_path, cifar_subset_dir):
    import dataclasses

    from monossl.pretrain import pretrain

    out = tmp_path / "rep"
    config = ReproduceConfig(method="bigan", data=f"cifar10:{cifar_subset_dir}", out=out, steps=3, batch_size=8,
                             probe_epochs=1, subset=100, test_subset=50, widths="8,8,16,16", rows="none",
                             progress=False)
    s = augmentations.settings(config)
    # the row's pretraining was interrupted after 1 of 3 steps
    assert not pretrain(dataclasses.replace(augmentations.pretrain_config("none", s, out / "none", config),
                                            stop_after=1)).finished
    assert (out / "none" / "last.pt").exists() and not (out / "none" / "trunk.pt").exists()
    assert augmentations.augmentation_table(config).stopped == {}
    log = [json.loads(line) for line in (out / "none" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 3]  # resumed from step 1 (a restart would be refused: last.pt exists)
    # and equal to an uninterrupted run of the row
    pretrain(augmentations.pretrain_config("none", s, tmp_path / "whole", config))
    a = torch.load(out / "none" / "trunk.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "whole" / "trunk.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list(json.loads((out / "results.json").read_text())["table"]) == ["none"]


def test_stopped_rows_are_reported_and_the_others_finish(tmp_path, cifar_subset_dir, monkeypatch, capsys):
    from monossl.methods.bigan import BiGAN

    def always_wins(self, d_real, d_fake, step):
        raise TrainingStopped("training stopped: the BiGAN discriminator has won outright (test)")

    monkeypatch.setattr(BiGAN, "_check_discriminator", always_wins)
    out = tmp_path / "rep"
    assert _reproduce(out, cifar_subset_dir, "--rows", "random,none") == 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["random"] and "won outright" in results["stopped"]["none"]
    md = (out / "table.md").read_text()
    assert "stopped (57.9)" in md and "Row `none` stopped: training stopped" in md
    assert "1 row(s) stopped: none" in capsys.readouterr().out


def test_findings_on_the_papers_numbers_and_a_failing_table():
    paper = {r: CIFAR10_BIGAN[cifar10_row(r)] for r in augmentations.ROWS}
    assert [f["holds"] for f in augmentations.findings(paper)] == [True, True, True, True, True]
    assert augmentations.findings(paper)[4]["detail"] == "mean with scale - mean without = +7.1"  # 67.93 - 60.78
    bad = {r: dict(v) for r, v in paper.items()}
    bad["jitter"]["conv1"] = 70.0  # a row without scale beats the rows with scale
    bad["none"]["conv1"] = 50.0  # and no-aug. is far from random
    assert [f["holds"] for f in augmentations.findings(bad)] == [False, True, True, False, True]
    for row in augmentations.WITH_SCALE:  # the rows with scale only 1.2 points above the others on average
        bad[row]["conv1"] = 62.0
    assert augmentations.findings(bad)[4]["holds"] is False
    assert augmentations.findings({})[0]["holds"] is None and augmentations.findings({})[4]["holds"] is None


def test_settings_budgets_and_bad_options():
    s = augmentations.settings(ReproduceConfig(method="deepcluster", budget="quick"))
    assert s["dc_patches"] == 8192 and s["dc_epochs"] == 8 and s["probe_subset"] == 10000
    assert s["image"] == ["builtin:astronaut"] and s["rows"] == list(augmentations.ROWS)
    s = augmentations.settings(ReproduceConfig(rows="all,random"))
    assert s["rows"] == ["random", "all"]  # the paper's order
    with pytest.raises(UserError, match="unknown row"):
        augmentations.settings(ReproduceConfig(rows="everything"))
    with pytest.raises(UserError, match="--widths"):
        augmentations.settings(ReproduceConfig(widths="8,8"))
    with pytest.raises(UserError, match="--arch applies to imagenet-finetune only"):
        augmentations.settings(ReproduceConfig(arch="alexnet-big"))
    # the newer methods have a length in every budget (their view augmentations go on top of each preset)
    for budget in augmentations.BUDGETS:
        for method in ("moco", "dino"):
            s = augmentations.settings(ReproduceConfig(method=method, budget=budget))
            assert s["steps"][method] and s["batch_size"][method] == augmentations.BUDGETS[budget].batch[method]
    config = augmentations.pretrain_config("jitter", s, "x", ReproduceConfig())
    assert config.method == "dino" and config.preset == "jitter" and config.steps == 30000
