"""`monossl reproduce sources`: one photograph beside other photographs, fractals, dead leaves, spectral
and white noise and the dataset, on equal footing (same trunk, initial weights per seed, method, budget,
probes); the table's cells are the rows' own probe numbers (mean ± sd over seeds), the statistics
control takes no step, reruns skip finished rows, other settings are refused in one line with nothing
written, --distill trains students, and every method trains a step on each procedural row's source."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics

import numpy as np
import pytest
import torch

from monossl import cli
from monossl.errors import UserError
from monossl.experiments import readme_tables, sources_output, sources_table
from monossl.experiments.table import ReproduceConfig
from monossl.models import random_trunk, trunk_config_from
from monossl.pretrain import PretrainConfig, initial_trunk, pretrain

from conftest import is_drawn_figure

WIDTHS = "8,8,16,16"
TINY = ["--steps", "2", "--batch-size", "8", "--probe-epochs", "1", "--subset", "100", "--test-subset", "40",
        "--widths", WIDTHS, "--quiet"]
PROCEDURAL = ("fractal-one", "fractals", "dead-leaves", "spectral", "noise")


def _unwhitened(trunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trunk's parameters with conv1's whitened parametrisation read as its U (what was initialised)."""
    return {n.replace("parametrizations.weight.original", "weight"): p.detach() for n, p in trunk.named_parameters()}


def _snapshot(root) -> dict:
    """Every file under root (but the lock) with its bytes and mtime."""
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_settings_are_the_main_jobs_one_image_row_and_bad_options_are_refused(tmp_path):
    s = sources_table.settings(ReproduceConfig(budget="main"))
    assert s["method"] == "simclr" and s["rows"] == list(sources_table.ROWS) and s["seeds"] == [0]
    assert s["steps"] is None and s["batch_size"] is None and s["whiten_conv1"] is True
    assert s["probe_subset"] is None and s["probe_test_subset"] is None and s["probe_epochs"] is None
    # the one-image row is `monossl compare`'s one-image row (experiments/compare.py builds it so)
    ours = sources_table.row_config("image", s, 3, tmp_path / "a")
    compare_row = PretrainConfig(method="simclr", out=tmp_path / "a", images=["builtin:astronaut"], preset="all",
                                 seed=3, whiten_conv1=True, progress=False)
    assert dataclasses.asdict(ours) == dataclasses.asdict(compare_row)
    # the other rows differ from it in their source only
    for row in (*sources_table.SOURCES, "full"):
        other = dataclasses.asdict(sources_table.row_config(row, s, 3, tmp_path / "a"))
        diff = {k for k, v in other.items() if dataclasses.asdict(ours)[k] != v}
        assert diff == ({"images", "data"} if row == "full" else {"images"}), row
    assert len(s["sources"]["ten-images"]) == 10 and s["sources"]["fractal-one"] == ["procedural:fractal:one"]
    s = sources_table.settings(ReproduceConfig(seeds=[2, 0, 2], rows="noise,random", method="rotnet"))
    assert s["seeds"] == [2, 0] and s["rows"] == ["random", "noise"] and s["method"] == "rotnet" and s["steps"] == 4
    for bad, words in ((ReproduceConfig(method="supervised"), "not self-supervised"),
                       (ReproduceConfig(method="simclr", distill="x"), "give one"),
                       (ReproduceConfig(arch="alexnet-big"), "--arch"),
                       (ReproduceConfig(rows="image,mandelbrot"), "unknown row"),
                       (ReproduceConfig(images=["procedural:noise"]), "one photograph"),
                       (ReproduceConfig(budget="paper"), "has budgets")):
        with pytest.raises(UserError, match=words):
            sources_table.settings(bad)


def test_every_row_of_a_seed_starts_from_the_same_initial_weights(tmp_path, cifar_subset_dir, one_thread):
    s = sources_table.settings(ReproduceConfig(data=f"cifar10:{cifar_subset_dir}", widths=WIDTHS))
    starts = {}
    for seed in (0, 1):
        random = dict(random_trunk("cifar", seed, **trunk_config_from(WIDTHS, None)).named_parameters())
        # every row for seed 0; a few for seed 1 (each start whitens on 4,096 samples of its source)
        for row in [r for r in sources_table.ROWS if r != "random" and (seed == 0 or r in ("image", "noise"))]:
            trunk, _, _, whitened = initial_trunk(sources_table.row_config(row, s, seed, tmp_path / row))
            assert whitened, row
            state = _unwhitened(trunk)
            assert state.keys() == random.keys(), row
            assert all(torch.equal(state[n], p.detach()) for n, p in random.items()), (seed, row)
            starts[seed, row] = trunk.conv1.weight.detach()
    # whitened on each row's own first samples: conv1 differs between sources (and seeds)
    assert not torch.allclose(starts[0, "image"], starts[0, "noise"])
    assert not torch.allclose(starts[0, "image"], starts[1, "image"])


@pytest.mark.slow
def test_the_table_holds_the_rows_own_numbers_and_reruns_skip(tmp_path, cifar_subset_dir, capsys, one_thread):
    out, rows, seeds = tmp_path / "table", ["random", "image-stats", "image", "fractal-one", "noise", "full"], [0, 1]
    argv = ["reproduce", "sources", "--budget", "smoke", "--data", f"cifar10:{cifar_subset_dir}",
            "--rows", ",".join(rows), "--seeds", "0,1", "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == seeds and results["config"]["method"] == "simclr"
    assert results["environment"]["torch"] == torch.__version__ and results["config"]["protocol"]["name"] == "cifar"
    cells, knn = results["cells"]["linear"], results["cells"]["knn_k20"]
    assert list(cells) == rows
    probes = {(r, k): json.loads((out / f"seed-{k}" / r / "probe-cifar" / "results.json").read_text())
              for r in rows for k in seeds}
    for row in rows:
        for tap in ("conv1", "conv2", "conv3", "conv4"):
            values = [float(probes[row, k]["taps"][tap]["top1"]) for k in seeds]
            cell = cells[row][tap]
            assert cell["values"] == {str(k): v for k, v in zip(seeds, values)} and cell["n"] == 2
            assert cell["mean"] == round(statistics.fmean(values), 3)
            assert cell["sd"] == round(statistics.stdev(values), 3)
            assert knn[row][tap]["mean"] == round(statistics.fmean(probes[row, k]["knn"][tap]["k20"] for k in seeds), 3)
        minutes = statistics.fmean(probes[row, k]["row_seconds"] for k in seeds) / 60
        assert results["minutes"][row] == round(minutes, 2)
    # not constants: the seeds' numbers differ somewhere, and rows differ from each other
    assert any(c["sd"] for r in rows for c in cells[r].values())
    assert len({tuple(c["mean"] for c in cells[r].values()) for r in rows}) > 1
    with open(out / "table.csv") as f:
        lines = list(csv.DictReader(f))
    linear_lines = [x for x in lines if x["metric"] == "linear"]
    assert len(linear_lines) == len(rows) * 4
    assert all(float(x["mean"]) == cells[x["row"]][x["tap"]]["mean"] for x in linear_lines)
    md = (out / "table.md").read_text()
    for row in rows:
        c = cells[row]["conv3"]
        assert f"| {sources_table.LABELS[row]} |" in md and f"{c['mean']:.1f} ± {c['sd']:.1f}" in md
    assert is_drawn_figure(out / "table.png")

    # trained rows: the method and budget on their own source, from the same seed
    for k in seeds:
        for row in ("image", "fractal-one", "noise", "full"):
            config = json.loads((out / f"seed-{k}" / row / "config.json").read_text())
            assert config["method"] == "simclr" and config["total_steps"] == 2 and config["seed"] == k
            assert config["batch_size"] == 8 and config["arch_config"]["widths"] == [8, 8, 16, 16]
            if row != "full":
                assert config["image"] == (["builtin:astronaut"] if row == "image" else sources_table.SOURCES[row])
        # the control takes no gradient step: every weight but conv1 is the random trunk's
        random = dict(random_trunk("cifar", k, **trunk_config_from(WIDTHS, None)).named_parameters())
        control = torch.load(out / f"seed-{k}" / "image-stats" / "trunk.pt", weights_only=True)
        assert control["meta"]["total_steps"] == 0 and control["meta"]["method"] == "statistics"
        assert not (out / f"seed-{k}" / "image-stats" / "last.pt").exists()
        for name, p in random.items():
            if name != "stages.conv1.0.weight":
                assert torch.equal(control["state_dict"][name], p.detach()), name
        assert probes["image-stats", k]["seen"]["steps"] == 0

    # a rerun trains and probes nothing: every row's files stay as they were
    before = _snapshot(out / "seed-0") | _snapshot(out / "seed-1")
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("done before") == len(rows) * 2
    assert _snapshot(out / "seed-0") | _snapshot(out / "seed-1") == before
    # other settings: refused in one line, nothing written
    results_before = results
    before = _snapshot(out)
    assert cli.main([*argv, "--batch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("monossl: error:") and "other settings (batch_size)" in err
    assert _snapshot(out) == before
    # a new seed for one row: only its row is made, and the table still covers the earlier rows
    assert cli.main([*argv[:6], "--rows", "random", "--seeds", "2", *argv[10:]]) == 0
    assert not (out / "seed-2" / "image").exists()
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]["linear"]
    assert list(cells) == rows and results["config"]["seeds"] == [0, 1, 2]
    assert cells["random"]["conv1"]["n"] == 3 and cells["image"]["conv1"]["n"] == 2
    assert cells["image"]["conv3"] == results_before["cells"]["linear"]["image"]["conv3"]
    # the README's copy of the table is drawn from results.json alone, as table.md's is
    md = (out / "table.md").read_text()
    assert readme_tables.render(results, "table") in md and readme_tables.render(results, "winners") in md
    assert "| random trunk | " in md and " | 3 | " in md.split("| random trunk |")[1].split("\n")[0]


@pytest.mark.slow
def test_distill_trains_the_sources_as_students(tmp_path, cifar_subset_dir, capsys, one_thread):
    data = f"cifar10:{cifar_subset_dir}"
    teacher = tmp_path / "teacher"
    pretrain(PretrainConfig(method="supervised", data=data, out=teacher, widths=WIDTHS, steps=2, batch_size=16,
                            progress=False))
    out = tmp_path / "students"
    assert cli.main(["reproduce", "sources", "--distill", str(teacher), "--data", data, "--rows", "random,noise",
                     "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    config = json.loads((out / "seed-0" / "noise" / "config.json").read_text())
    assert config["method"] == "distill" and config["method_config"]["teacher"] == str(teacher.resolve())
    assert config["image"] == ["procedural:noise"] and config["total_steps"] == 2
    student = json.loads((out / "seed-0" / "noise" / "student.json").read_text())["student"]
    assert results["cells"]["student"]["noise"]["top1"]["mean"] == round(student["top1"], 3)
    assert "random" not in results["cells"]["student"]
    probe = json.loads((out / "seed-0" / "noise" / "probe-cifar" / "results.json").read_text())
    assert results["cells"]["linear"]["noise"]["conv2"]["mean"] == round(float(probe["taps"]["conv2"]["top1"]), 3)
    md = (out / "table.md").read_text()
    assert "student top-1" in md and results["config"]["teacher"] == str(teacher.resolve())
    # the students' own scores ranked as the probes are (one contender here: it wins, with no runner-up)
    student_winners = readme_tables.render(results, "student-winners")
    assert student_winners in md and "| top1 | white noise |" in student_winners
    assert cli.main(["reproduce", "methods", "--distill", str(teacher)]) == 2
    assert "apply to sources only" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A classifier run with random weights: enough to distil from for a step."""
    from monossl.models import build_trunk, save_trunk
    from monossl.models.classifier import save_classifier

    run = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    trunk = build_trunk("cifar", **trunk_config_from(WIDTHS, None))
    save_trunk(run / "trunk.pt", trunk, {"method": "supervised"})
    save_classifier(run / "classifier.pt", torch.nn.Linear(trunk.feature_dim, 10))
    return run


@pytest.mark.parametrize("method", ["rotnet", "deepcluster", "bigan", "simclr", "moco", "dino", "distill"])
def test_every_method_trains_a_step_on_each_procedural_row(method, tmp_path, tiny_teacher, one_thread):
    mode = {"distill": str(tiny_teacher)} if method == "distill" else {"method": method}
    s = sources_table.settings(ReproduceConfig(steps=1, batch_size=8, widths=WIDTHS, whiten_conv1=False, **mode))
    for row in PROCEDURAL:
        out = tmp_path / row
        run = pretrain(sources_table.row_config(row, s, 0, out))
        assert run.finished and run.steps_done == 1 and (out / "trunk.pt").is_file(), row
        losses = [v for key, v in run.metrics.items() if "loss" in key]
        assert losses and all(np.isfinite(losses)), (row, run.metrics)
        config = json.loads((out / "config.json").read_text())
        assert config["method"] == method and config["image"] == sources_table.SOURCES[row]
        if method == "deepcluster":  # a finite set of the stream's first patches, as the budget says
            assert config["source"]["length"] == sources_table.DC_PATCHES["smoke"]


def test_winners_are_ranked_on_the_means_with_leads_in_pooled_sd_units():
    def cell(*values):
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                "n": len(values), "values": dict(enumerate(values))}

    linear = {
        "full": {"conv1": cell(90.0, 91.0)},  # a reference, never the winner
        "image": {"conv1": cell(60.0, 62.0, 64.0)},  # mean 62, sd 2
        "fractals": {"conv1": cell(57.0, 59.0, 61.0)},  # mean 59, sd 2
        "noise": {"conv1": cell(50.0, 51.0, 52.0)},
        "chelsea": {"conv1": cell(61.0)},  # one seed: no sd
    }
    record = {"cells": {"linear": linear}, "labels": {r: r.upper() for r in linear}}
    w = sources_output.winners(record)["conv1"]
    assert w["best"] == "IMAGE" and w["runner_up"] == "CHELSEA" and w["points"] == 1.0 and w["sd_units"] is None
    vs = w["image_vs_best_synthetic"]
    assert vs["synthetic"] == "FRACTALS" and vs["points"] == 3.0 and vs["sd_units"] == 1.5  # 3 / sqrt((4 + 4) / 2)
    md = sources_output.winners_markdown(record)
    assert "| conv1 | IMAGE | CHELSEA | +1.0 (one seed: no sd) | +3.0 (1.5 sd) vs FRACTALS |" in md
