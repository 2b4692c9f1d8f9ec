"""The main job's rows (same initial weights, statistics controls without gradient steps, each from its
own data), tables over seeds, the samples each row saw, refused settings, and README tables generated
from committed results."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monossl.cli import main
from monossl.experiments.compare import REFERENCE_EPOCHS
from monossl.experiments.compare_output import curves_markdown, split_gains
from monossl.experiments.seeds import aggregate, cells_csv, format_cell
from monossl.models import random_trunk
from monossl.pretrain import PretrainConfig, first_samples, initial_trunk, pretrain, statistics_trunk

from conftest import is_drawn_figure

REPO = Path(__file__).resolve().parents[1]


def _row_configs(data: str, tmp_path) -> dict[str, PretrainConfig]:
    """The pretraining of compare's trained rows (image, full, supervised), as compare builds them."""
    common = dict(method="simclr", seed=3, whiten_conv1=True)
    return {"image": PretrainConfig(out=tmp_path / "image", images=["builtin:astronaut"], **common),
            "full": PretrainConfig(out=tmp_path / "full", data=data, **common),
            "supervised": PretrainConfig(out=tmp_path / "sup", **{**common, "method": "supervised"}, data=data)}


def _unwhitened_state(trunk) -> dict[str, torch.Tensor]:
    """The trunk's parameters with conv1's whitened parametrisation read as its U (what was initialised)."""
    state = {}
    for name, p in trunk.named_parameters():
        state[name.replace("parametrizations.weight.original", "weight")] = p.detach()
    return state


def test_every_row_starts_from_the_random_rows_weights(cifar_subset_dir, tmp_path):
    random = dict(random_trunk("cifar", 3).named_parameters())
    for row, config in _row_configs(f"cifar10:{cifar_subset_dir}", tmp_path).items():
        trunk, _, _, whitened = initial_trunk(config)
        assert whitened
        state = _unwhitened_state(trunk)
        assert state.keys() == random.keys(), row
        for name, p in random.items():
            assert torch.equal(state[name], p.detach()), (row, name)


def test_a_trained_row_really_starts_there(cifar_subset_dir, tmp_path):
    # lr 0: one step moves no weight, so trunk.pt shows the start: conv1 = U0 Z, every other weight random
    config = PretrainConfig(out=tmp_path / "run", method="simclr", data=f"cifar10:{cifar_subset_dir}", seed=3,
                            steps=1, batch_size=16, lr=0.0, progress=False)
    pretrain(config)
    saved = torch.load(tmp_path / "run" / "trunk.pt", weights_only=True)["state_dict"]
    start, _, _, _ = initial_trunk(config)
    random = random_trunk("cifar", 3).state_dict()
    with torch.no_grad():
        assert torch.allclose(saved["stages.conv1.0.weight"], start.conv1.weight, atol=1e-6)
    for name, value in random.items():
        if "conv1.0" not in name and value.dtype.is_floating_point and "running" not in name:
            assert torch.equal(saved[name], value), name


def test_statistics_controls_take_no_step_and_take_their_own_datas_statistics(cifar_subset_dir, tmp_path):
    configs = _row_configs(f"cifar10:{cifar_subset_dir}", tmp_path)
    random = random_trunk("cifar", 3)
    controls = {}
    for row in ("image", "full"):
        trunk, meta = statistics_trunk(configs[row], bn_samples=300)
        controls[row] = trunk
        assert meta["total_steps"] == 0 and meta["method"] == "statistics" and meta["bn_samples"] == 256
        # no gradient step: every weight but conv1 is the random trunk's; conv1 is U0 Z of this row's data
        for name, p in random.named_parameters():
            if name != "stages.conv1.0.weight":
                assert torch.equal(dict(trunk.named_parameters())[name], p), (row, name)
        start, source, _, _ = initial_trunk(configs[row])
        with torch.no_grad():
            assert torch.allclose(trunk.conv1.weight, start.conv1.weight, atol=1e-6)
        # conv1's BatchNorm mean = the mean conv1 response over this row's own first samples, at the input size
        images = first_samples(source, 256)  # whole batches of 256
        images = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True) if images.shape[-1] != 32 \
            else images
        with torch.no_grad():
            response = trunk.conv1(trunk._input(images)).mean((0, 2, 3))
        bn = trunk.stages["conv1"][1]
        assert torch.allclose(bn.running_mean, response, atol=1e-4, rtol=1e-4), row
        assert not torch.allclose(bn.running_mean, random.stages["conv1"][1].running_mean)
    assert not torch.allclose(controls["image"].conv1.weight, controls["full"].conv1.weight)
    assert not torch.allclose(controls["image"].stages["conv1"][1].running_var,
                              controls["full"].stages["conv1"][1].running_var)


def test_seeds_aggregate_a_constructed_table():
    tables = {0: {"random": {"conv1": 50.0, "conv2": 60.0}, "image": {"conv1": 58.0, "conv2": 66.0}},
              1: {"random": {"conv1": 52.0, "conv2": 61.0}, "image": {"conv1": 61.0, "conv2": 66.0}},
              2: {"random": {"conv1": 54.0, "conv2": 65.0}, "image": {"conv1": 61.0, "conv2": 69.0},
                  "full-long": {"conv1": 70.0, "conv2": 71.0}}}
    cells = aggregate(tables)
    assert list(cells) == ["random", "image", "full-long"]
    c = cells["random"]["conv1"]
    assert c["mean"] == 52.0 and c["sd"] == 2.0 and c["n"] == 3 and c["values"] == {0: 50.0, 1: 52.0, 2: 54.0}
    assert cells["image"]["conv2"]["sd"] == round(statistics.stdev([66.0, 66.0, 69.0]), 3) == 1.732
    assert cells["full-long"]["conv1"] == {"values": {2: 70.0}, "n": 1, "mean": 70.0, "sd": None}
    assert format_cell(c) == "52.0 ± 2.0" and format_cell(cells["full-long"]["conv1"]) == "70.0"
    lines = cells_csv(cells).splitlines()
    assert lines[0] == "row,tap,n,mean,sd,seed0,seed1,seed2"
    assert lines[1] == "random,conv1,3,52.0,2.0,50.0,52.0,54.0" and lines[-1] == "full-long,conv2,1,71.0,,,,71.0"
    # the split of the gain: per seed first (image - random with no control row: nothing to split)
    assert split_gains(tables[0]) == {}
    with_control = {**tables[0], "image-stats": {"conv1": 55.0, "conv2": 61.0}}
    assert split_gains(with_control)["one image"] == {"statistics": {"conv1": 5.0, "conv2": 1.0},
                                                      "learning": {"conv1": 3.0, "conv2": 5.0}}


def _compare(tmp_path, cifar_subset_dir, *extra):
    return ["compare", "--data", f"cifar10:{cifar_subset_dir}", "--steps", "2", "--supervised-steps", "2",
            "--probe-epochs", "1", "--quiet", *extra]


def test_a_changed_row_setting_is_refused_on_rerun(tmp_path, cifar_subset_dir, capsys):
    out = str(tmp_path / "cmp")
    assert main(_compare(tmp_path, cifar_subset_dir, "--rows", "random", "--out", out)) == 0
    settings = json.loads((tmp_path / "cmp" / "settings.json").read_text())
    assert settings["whiten_conv1"] is True
    capsys.readouterr()
    assert main(_compare(tmp_path, cifar_subset_dir, "--rows", "random", "--out", out, "--no-whiten-conv1")) == 2
    err = capsys.readouterr().err
    assert "other settings (whiten_conv1)" in err and err.count("\n") == 1
    # a table directory written before whitening was recorded: refused, not trusted
    del settings["whiten_conv1"]
    (tmp_path / "cmp" / "settings.json").write_text(json.dumps(settings))
    assert main(_compare(tmp_path, cifar_subset_dir, "--rows", "random", "--out", out)) == 2
    assert "did not record whiten_conv1" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_over_seeds_with_controls_and_reused_references(tmp_path, cifar_subset_dir, capsys):
    out, refs = tmp_path / "cmp", tmp_path / "refs"
    argv = _compare(tmp_path, cifar_subset_dir, "--seeds", "0,1", "--references", "long", "--out", str(out),
                    "--reference-dir", str(refs))
    assert main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["kind"] == "compare-seeds"
    assert list(summary["rows"]) == ["random", "image-stats", "image", "data-stats", "full", "supervised",
                                     "full-long", "supervised-long"]
    per_seed = {s: json.loads((out / f"seed-{s}" / "results.json").read_text())["table"] for s in (0, 1)}
    for row in ("random", "image-stats", "image"):
        values = [per_seed[s][row]["conv2"] for s in (0, 1)]
        cell = summary["cells"][row]["conv2"]
        assert cell["mean"] == pytest.approx(statistics.fmean(values), abs=1e-3)
        assert cell["sd"] == pytest.approx(statistics.stdev(values), abs=1e-3)
    # references: the first seed only, trained once with learning curves and their epochs recorded
    assert summary["cells"]["full-long"]["conv1"]["n"] == 1 and "full-long" not in per_seed[1]
    seen = summary["rows"]["supervised-long"]["seen"]
    epochs = REFERENCE_EPOCHS["long"]["supervised-long"]
    assert seen["epochs"] == pytest.approx(seen["images"] / 500, abs=0.005) and seen["steps"] == epochs * (500 // 128)
    assert summary["rows"]["supervised"]["seen"]["samples"] == 2 * 128
    assert summary["rows"]["image"]["seen"] == {"steps": 2, "images": 256, "samples": 512, "epochs": None}
    assert summary["rows"]["image-stats"]["seen"]["steps"] == 0
    (ref_run,) = refs.glob("supervised-long-*")
    curves = [json.loads(line) for line in (ref_run / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in curves if r.get("event") == "probe"]) >= 2
    assert is_drawn_figure(ref_run / "learning_curves.png") and is_drawn_figure(out / "table.png")
    md = (out / "table.md").read_text()
    cell = summary["cells"]["image"]["conv3"]
    assert f"{cell['mean']:.1f} ± {cell['sd']:.1f}" in md and "one image: learning" in md
    # a later table with the same settings reuses the references (no training: trunk.pt untouched)
    stamp = (ref_run / "trunk.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_compare(tmp_path, cifar_subset_dir, "--references", "long", "--rows", "supervised-long",
                         "--out", str(tmp_path / "other"), "--reference-dir", str(refs))) == 0
    assert (ref_run / "trunk.pt").stat().st_mtime_ns == stamp
    other = json.loads((tmp_path / "other" / "results.json").read_text())
    assert json.loads((tmp_path / "other" / "supervised-long" / "reference.json").read_text())["run"] == str(ref_run)
    assert other["rows"]["supervised-long"]["seen"] == seen
    # generated Markdown tables from these results: drawn, and a hand edit is caught
    readme = tmp_path / "README.md"
    shutil.copy(out / "results.json", tmp_path / "summary.json")
    readme.write_text("# x\n<!-- table: summary.json table -->\n<!-- end table -->\n"
                      "<!-- table: summary.json per-seed -->\nstale\n<!-- end table -->\n")
    root = ["--root", str(tmp_path)]
    assert main(["tables", str(readme), "--check", *root]) == 1
    assert main(["tables", str(readme), *root]) == 0
    assert main(["tables", str(readme), "--check", *root]) == 0
    text = readme.read_text()
    assert f"{cell['mean']:.1f} ± {cell['sd']:.1f}" in text and "stale" not in text
    readme.write_text(text.replace(f"{cell['mean']:.1f} ± {cell['sd']:.1f}", "99.9 ± 0.1"))
    capsys.readouterr()
    assert main(["tables", str(readme), "--check", *root]) == 1
    assert "differs from summary.json table" in capsys.readouterr().out


def test_readme_tables_equal_their_committed_results(capsys):
    readme = REPO / "README.md"
    text = readme.read_text()
    assert "<!-- table: results/" in text  # the README's tables are generated ones
    assert main(["tables", str(readme), str(REPO / "docs" / "one_image.md"), "--check", "--root", str(REPO)]) == 0, \
        capsys.readouterr().out


def test_learning_curves_table_gives_each_point_its_epochs():
    """A reference's curve points become rows, each step turned into epochs by the run's own count."""
    summary = {"config": {"method": "simclr"},
               "rows": {"full-long": {"seen": {"steps": 400, "epochs": 2.0},
                                      "curves": [{"step": 0, "top1": {"conv1": 50.0, "conv2": 51.0}},
                                                 {"step": 300, "top1": {"conv1": 60.0, "conv2": 62.5}}]},
                        "random": {"seen": None}}}
    lines = curves_markdown(summary).splitlines()
    assert lines[0] == "| training data | step | epochs | conv1 | conv2 |"
    assert lines[2:] == ["| full data (simclr), converged | 0 | 0.0 | 50.0 | 51.0 |",
                         "| full data (simclr), converged | 300 | 1.5 | 60.0 | 62.5 |"]
    assert curves_markdown({"config": {"method": "simclr"}, "rows": {"random": {}}}) == ""


def test_reference_options_without_references_are_refused(tmp_path, cifar_subset_dir, capsys):
    out = tmp_path / "cmp"
    assert main(_compare(tmp_path, cifar_subset_dir, "--out", str(out), "--reference-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert "--reference-dir apply to --references only" in err and err.count("\n") == 1 and not out.exists()


def test_tables_names_a_missing_results_file_and_an_unknown_part(tmp_path, capsys):
    md = tmp_path / "x.md"
    md.write_text("<!-- table: nothing.json table -->\n<!-- end table -->\n")
    assert main(["tables", str(md), "--root", str(tmp_path)]) == 2
    assert "nothing.json" in capsys.readouterr().err
    (tmp_path / "r.json").write_text(json.dumps({"kind": "compare-seeds"}))
    md.write_text("<!-- table: r.json bars -->\n<!-- end table -->\n")
    assert main(["tables", str(md), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no table 'bars'" in err and err.count("\n") == 1
