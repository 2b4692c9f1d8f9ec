"""`monossl reproduce methods`: every method on one image and on the dataset, linear and k-NN per
tap on two labelled sets (one of them 96-px STL-10, resized for the 32-px trunk), the table equal
to the rows' own results, reruns skip, other settings and options refused."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from monossl import cli
from monossl.errors import UserError
from monossl.experiments import methods_table
from monossl.experiments.table import ReproduceConfig

from conftest import is_drawn_figure

TINY = ["--steps", "2", "--batch-size", "8", "--probe-epochs", "1", "--subset", "100", "--test-subset", "40",
        "--widths", "8,8,16,16", "--quiet"]
ROWS = "random,rotnet,moco,dino,dino-data,supervised"


def write_stl10(root, n_train=100, n_test=40):
    """An stl10_binary folder of 96-px images (each class its own colour, plus noise)."""
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        chw = rng.integers(0, 60, size=(n, 3, 96, 96), dtype=np.uint8)
        chw[:, 0] += (labels * 19).astype(np.uint8)[:, None, None]
        chw.transpose(0, 1, 3, 2).tofile(d / f"{split}_X.bin")  # stored column-major, as the real files
        (labels + 1).astype(np.uint8).tofile(d / f"{split}_y.bin")
    return root


@pytest.mark.slow
def test_methods_table_on_two_datasets_and_a_rerun_skips(tmp_path, cifar_subset_dir, capsys):
    out, stl = tmp_path / "table", write_stl10(tmp_path / "stl")
    argv = ["reproduce", "methods", "--budget", "smoke", "--data", f"cifar10:{cifar_subset_dir}",
            "--eval-data", f"stl10:{stl}", "--rows", ROWS, "--out", str(out), *TINY]
    assert cli.main(argv) == 0
    rows = ROWS.split(",")
    results = json.loads((out / "results.json").read_text())
    datasets = [f"cifar10:{cifar_subset_dir}", f"stl10:{stl}"]
    assert list(results["tables"]) == datasets
    for row in rows:
        assert (out / row / "trunk.pt").exists()
        for dataset, probe_dir in zip(datasets, ("probe-cifar", "probe-cifar-stl10")):
            probe = json.loads((out / row / probe_dir / "results.json").read_text())
            assert probe["dataset"] == dataset
            table = results["tables"][dataset]
            # the table holds the rows' own numbers: linear and k-NN per tap
            assert table["linear"][row] == {t: float(v["top1"]) for t, v in probe["taps"].items()}
            assert table["knn"][row] == probe["knn"] and set(probe["knn"]["conv1"]) == {"k20", "k200"}
    stl_probe = json.loads((out / "random" / "probe-cifar-stl10" / "results.json").read_text())
    assert stl_probe["n_train"] == 100 and stl_probe["n_test"] == 40 and stl_probe["num_classes"] == 10
    for row in ("rotnet", "moco", "dino"):
        config = json.loads((out / row / "config.json").read_text())
        assert config["method"] == row and config["total_steps"] == 2 and config["image"] == ["builtin:astronaut"]
    assert json.loads((out / "dino-data" / "config.json").read_text())["data"] == f"cifar10:{cifar_subset_dir}"

    checks = results["tables"][datasets[0]]["beats_random"]
    assert [c["row"] for c in checks] == ["rotnet", "moco", "dino"]
    linear = results["tables"][datasets[0]]["linear"]
    for c in checks:  # recomputed from the table's own numbers
        margins = {t: round(linear[c["row"]][t] - linear["random"][t], 2) for t in linear["random"]}
        assert c["margins"] == margins and c["holds"] == (min(margins.values()) > 0)

    with open(out / "table.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(rows) * 2 * 4  # rows x datasets x taps
    md = (out / "table.md").read_text()
    assert md.count("### ") == 2 and "dino, cifar10" in md and "k20 conv1" in md
    assert all(is_drawn_figure(out / name) for name in ("table.png", "knn.png", "table-stl10.png", "knn-stl10.png"))

    capsys.readouterr()
    assert cli.main(argv) == 0  # a rerun trains and probes nothing
    assert capsys.readouterr().out.count("done before") == len(rows) * 2
    assert cli.main([*argv[:-len(TINY)], *TINY[:-1], "--steps", "3", "--quiet"]) == 2  # other settings


def test_settings_budgets_and_refusals():
    s = methods_table.settings(ReproduceConfig(budget="main"))
    assert s["rows"] == list(methods_table.ROWS) and len(s["rows"]) == 14
    # the main budget: every method's own default length; supervision sees the main job's samples
    from monossl.pretrain import defaults_of

    assert all(s["steps"][m] is None for m in methods_table.METHODS) and s["steps"]["supervised"] == 2000
    assert s["probe_subset"] is None and s["probe_test_subset"] is None and s["knn"] == [20, 200]
    config = methods_table.pretrain_config("deepcluster", s, "x", ReproduceConfig(budget="main"))
    assert config.steps is None and config.num_patches is None and defaults_of("deepcluster").steps == 4096
    smoke = methods_table.settings(ReproduceConfig(budget="smoke"))
    assert methods_table.pretrain_config("deepcluster", smoke, "x", ReproduceConfig()).num_patches == 256
    data_row = methods_table.pretrain_config("deepcluster-data", smoke, "x", ReproduceConfig())
    assert data_row.data == "cifar10" and data_row.images is None and data_row.steps == 4 and not data_row.epochs
    for bad, message in ((dict(method="rotnet"), "--method does not apply"), (dict(budget="quick"), "has budgets"),
                         (dict(arch="alexnet-big"), "takes cifar, resnet18-cifar"),
                         (dict(rows="random,nope"), "unknown row"),
                         (dict(eval_data=["stl10", "stl10:/elsewhere"]), "share probe-cifar-stl10/")):
        with pytest.raises(UserError, match=message):
            methods_table.settings(ReproduceConfig(**{"budget": "smoke", **bad}))
    assert cli.main(["reproduce", "cifar10-augmentations", "--eval-data", "stl10"]) == 2
