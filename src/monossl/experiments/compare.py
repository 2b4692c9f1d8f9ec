"""The main job, `compare(CompareConfig) -> Table`: the paper's per-layer figure at CIFAR scale.

Four rows on one trunk, each probed with linear classifiers on conv1..conv4 of the frozen
trunk (the same `cifar` probe for all):

    random      the freshly initialised trunk (no training)
    image       the self-supervised method (`method`) on patches of one image
    full        the same method, same budget, on the dataset's training images without labels
                (the paper's "1M images" row)
    supervised  the trunk trained with the dataset's labels, on at least as many samples as the
                one-image row saw (so supervision is not handicapped)

Writes one table (table.md, table.csv, results.json), a grouped bar chart (table.png) and the
conv1 filters of every row side by side with their spatial coherence (filters.png). Each row is
its own run directory under `out` (experiments/table.py: reruns skip finished rows, resume an
interrupted one, and refuse other settings for the same `out`).
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from monossl import runs
from monossl.errors import TrainingStopped, UserError
from monossl.experiments.table import Row, Table, check_table_settings, parse_rows, pretrained, run_rows
from monossl.models import load_trunk, random_trunk, trunk_config_from
from monossl.pretrain import DEFAULT_BATCH, DEFAULT_STEPS, PretrainConfig, method_class

ROWS = {
    "random": "random trunk",
    "image": "one image",
    "full": "full data (no labels)",
    "supervised": "supervised",
}
#: the self-supervised method of the main job (docs/one_image.md, "The recipe")
DEFAULT_METHOD = "simclr"


@dataclass
class CompareConfig:
    data: str = "cifar10"
    method: str = DEFAULT_METHOD
    image: str | None = None  # None: the built-in default image
    preset: str = "all"
    rows: str | None = None  # "random,image": a subset, in the table's order
    widths: str | None = None
    conv1_kernel: int | None = None
    out: str | Path = "runs/compare"
    seed: int = 0
    steps: int | None = None  # of the image and full rows (None: pretrain's default for the method)
    supervised_steps: int | None = None  # None: as many samples as the image row
    probe_epochs: int | None = None
    subset: int | None = None  # probe on a class-balanced subset of N training images
    test_subset: int | None = None
    device: str = "auto"
    progress: bool = True


def supervised_steps(method: str, steps: int | None) -> int:
    """Supervised steps that show the trunk at least as many samples as `steps` of `method`
    (RotNet's four rotations and SimCLR's two views count as samples)."""
    samples = (steps or DEFAULT_STEPS[method]) * DEFAULT_BATCH[method] * method_class(method).views
    return max(DEFAULT_STEPS["supervised"], math.ceil(samples / DEFAULT_BATCH["supervised"]))


def row_labels(method: str) -> dict[str, str]:
    return {"random": "random", "image": f"one image ({method})", "full": f"full data ({method})",
            "supervised": "supervised"}


def compare(config: CompareConfig) -> Table:
    from monossl.data.datasets import load_pair, subset
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.eval.probe import probe
    from monossl.eval.protocols import get_protocol

    rows = parse_rows(config.rows, tuple(ROWS))
    if config.method == "supervised" or method_class(config.method).needs != "images":
        raise UserError(f"--method {config.method} is not self-supervised; choose one that learns from images alone")
    image = config.image or f"builtin:{DEFAULT_IMAGE}"
    sup_steps = config.supervised_steps or supervised_steps(config.method, config.steps)
    trunk_config = trunk_config_from(config.widths, config.conv1_kernel)
    train_set, test_set = load_pair(config.data)
    if config.subset:
        train_set = subset(train_set, config.subset, seed=config.seed)
    if config.test_subset:
        test_set = subset(test_set, config.test_subset, seed=config.seed)
    protocol = get_protocol("cifar").with_overrides(epochs=config.probe_epochs)
    out = runs.lock_run_dir(config.out)  # only now: bad input leaves no empty directory behind
    settings = {"data": config.data, "method": config.method, "image": config.image, "preset": config.preset,
                "seed": config.seed, "steps": config.steps, "probe_epochs": config.probe_epochs,
                "subset": config.subset, "test_subset": config.test_subset, "widths": config.widths,
                "conv1_kernel": config.conv1_kernel, "supervised_steps": sup_steps}
    check_table_settings(out, settings, "settings.json", ignore=())

    common = dict(method=config.method, widths=config.widths, conv1_kernel=config.conv1_kernel, seed=config.seed,
                  device=config.device, steps=config.steps, progress=None if config.progress else False)
    per_row = {"image": dict(images=[image], preset=config.preset), "full": dict(data=config.data),
               "supervised": dict(method="supervised", data=config.data, steps=sup_steps)}

    def trained(row: str):
        """The row's pretrained trunk, pretraining (or resuming) it first when needed."""
        return load_trunk(pretrained(PretrainConfig(out=out / row, **{**common, **per_row[row]})))

    def make(row: str):
        def probe_row():
            if row == "random":
                trunk, meta = random_trunk("cifar", config.seed, **trunk_config), {"method": "random",
                                                                                   "seed": config.seed}
            else:
                trunk, meta = trained(row)
            return probe(trunk, train_set, test_set, protocol, device=config.device, seed=config.seed,
                         progress=config.progress, meta=meta, dataset=config.data)
        return probe_row

    done = run_rows([Row(r, ROWS[r], out / r / f"probe-{protocol.name}" / "results.json", make(r)) for r in rows])
    if done.stopped:  # the comparison needs every row
        raise TrainingStopped("; ".join(f"{r}: {m}" for r, m in done.stopped.items()))
    table_config = {
        "data": config.data, "method": config.method, "image": image, "preset": config.preset, "seed": config.seed,
        "rows": rows, "steps": config.steps, "supervised_steps": sup_steps,
        "subset": config.subset, "test_subset": config.test_subset,
        "trunk": {"widths": config.widths, "conv1_kernel": config.conv1_kernel}, "protocol": protocol.to_dict(),
        "seconds_per_row": done.seconds,
    }
    md = write_table(out, rows, done.results, table_config)
    write_figures(out, rows, done.results, table_config, trunk_config)
    return Table(out, md, {}, ("table.md", "table.csv", "results.json", "table.png", "filters.png"))


def write_figures(out: Path, rows: list[str], results: dict, config: dict, trunk_config: dict) -> None:
    """table.png (grouped bars per layer) and filters.png (conv1 of every row, spatial coherence)."""
    from monossl.viz.filters import write_filters
    from monossl.viz.networks import Network
    from monossl.viz.plots import write_layer_bars

    labels = row_labels(config["method"])
    table = {r: {t: v["top1"] for t, v in results[r]["taps"].items()} for r in rows}
    write_layer_bars(table, out / "table.png", title=f"{config['data']}, seed {config['seed']}", row_labels=labels)
    networks = []
    for r in rows:
        trunk = random_trunk("cifar", config["seed"], **trunk_config) if r == "random" else load_trunk(out / r)[0]
        networks.append(Network(labels[r], trunk.eval()))
    write_filters(networks, out / "filters.png")


def write_table(out: Path, rows: list[str], results: dict, config: dict) -> str:
    taps = list(next(iter(results.values()))["taps"])
    header = ["training data"] + taps
    labels = row_labels(config["method"])
    body = [[labels[r]] + [float(results[r]["taps"][t]["top1"]) for t in taps] for r in rows]
    md = ("Linear-probe top-1 (%) on each conv tap, final epoch, protocol "
          f"`{config['protocol']['name']}`, data {config['data']}, seed {config['seed']}; "
          f"{config['method']} for {config['steps'] or 'its default'} steps, supervised for "
          f"{config['supervised_steps']} steps.\n\n"
          + runs.markdown_table(header, body))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "tap", "top1", "top5", "best_top1", "best_epoch", "pooled_size"])
    for r in rows:
        for t in taps:
            v = results[r]["taps"][t]
            writer.writerow([r, t, v["top1"], v["top5"], v["best_top1"], v["best_epoch"], v["pooled_size"]])
    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", buf.getvalue())
    runs.write_json(out / "results.json", {
        "config": config,
        "table": {r: {t: results[r]["taps"][t]["top1"] for t in taps} for r in rows},
        "rows": {r: {k: results[r][k] for k in ("taps", "trunk", "n_train", "n_test", "timings")} for r in rows},
        "environment": runs.environment(),
    })
    return md
