"""The paper's CIFAR-10 augmentation table, `augmentation_table(ReproduceConfig) -> Table`
(`monossl reproduce cifar10-augmentations`).

Ten rows (PAPER.md §5): fully supervised, random features, and one self-supervised run per
augmentation preset of the patch stream (none, jitter, rotation, scale, rotation+jitter,
rotation+scale, jitter+scale, all) on one image (the built-in default unless `images`), with
`method` bigan (the paper's table), rotnet, deepcluster, simclr, moco or dino (whose own view
augmentations come on top of the stream's preset). Each row is its own run
directory under `out` (OUT/<row>/, the probe in OUT/<row>/probe-cifar/); conv1..conv4 of every
trunk are probed with the `cifar` protocol. Writes OUT/table.md, table.csv, results.json (ours,
the paper's number and the difference in every cell, and the paper's findings checked on our
numbers) and table.png (grouped bars, the paper's numbers as black diamonds). Reruns, stopped
rows: experiments/table.py.

Budgets (`BUDGETS`, see docs/bigan.md for how `quick` was sized):
    smoke  minutes on CPU: a few steps per row, probes on 1000/500 CIFAR images for 2 epochs;
    quick  the whole table for one method in about an hour on 2 CPU cores;
    paper  the paper's scale, for a GPU (pretraining sizes chosen here; full CIFAR-10 probes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from monossl import paper, runs
from monossl.errors import UserError
from monossl.eval.results import probe_dir_name
from monossl.experiments.table import (
    Budget,
    ReproduceConfig,
    Row,
    Table,
    cell_rows,
    cells,
    cells_csv,
    check_table_settings,
    parse_rows,
    pretrained,
    run_rows,
    samples_seen,
    seen_text,
)
from monossl.models import load_trunk, random_trunk, save_trunk, trunk_config_from
from monossl.pretrain import WHITEN_CONV1_ARCHS, PretrainConfig, defaults_of

log = logging.getLogger(__name__)

EXPERIMENT = "cifar10-augmentations"
SSL_METHODS = ("bigan", "rotnet", "deepcluster", "simclr", "moco", "dino")
#: the patch-stream presets, in the paper's row order
PRESET_ROWS = ("none", "jitter", "rotation", "scale", "rotation+jitter", "rotation+scale", "jitter+scale", "all")
ROWS = ("supervised", "random", *PRESET_ROWS)
TAPS = ("conv1", "conv2", "conv3", "conv4")
WITH_SCALE = tuple(r for r in PRESET_ROWS if "scale" in r or r == "all")
WITHOUT_SCALE = tuple(r for r in PRESET_ROWS if r not in WITH_SCALE)


BUDGETS = {
    "smoke": Budget(
        "smoke",
        steps={"bigan": 6, "rotnet": 6, "simclr": 6, "moco": 6, "dino": 6, "supervised": 6},
        batch={"bigan": 16, "rotnet": 16, "simclr": 16, "moco": 16, "dino": 16, "deepcluster": 32, "supervised": 32},
        dc_patches=256, dc_epochs=2, probe_subset=1000, probe_test_subset=500, probe_epochs=2,
        note="a check that every piece runs; the numbers mean nothing"),
    "quick": Budget(
        "quick",
        # SimCLR and MoCo: 600 x 64 images x 2 views, as many samples as RotNet's 600 x 32 x 4 rotations;
        # DINO: 600 x 32 images x 6 crops (2 of 32 px, 4 of 16 px)
        steps={"bigan": 400, "rotnet": 600, "simclr": 600, "moco": 600, "dino": 600, "supervised": 500},
        batch={"bigan": 32, "rotnet": 32, "simclr": 64, "moco": 64, "dino": 32, "deepcluster": 64,
               "supervised": 128},
        dc_patches=8192, dc_epochs=8, probe_subset=10000, probe_test_subset=2000, probe_epochs=15,
        note="the whole table for one method in about an hour on 2 CPU cores (estimate in docs/bigan.md)"),
    "paper": Budget(
        "paper",
        steps={"bigan": 60000, "rotnet": 30000, "simclr": 30000, "moco": 30000, "dino": 30000, "supervised": 15600},
        batch={"bigan": 128, "rotnet": 192, "simclr": 256, "moco": 256, "dino": 128, "deepcluster": 256,
               "supervised": 128},
        dc_patches=100_000, dc_epochs=30, probe_subset=None, probe_test_subset=None, probe_epochs=None,
        note="the paper's scale, for a GPU; pretraining sizes chosen here (the paper's CIFAR schedule is not "
             "known): BiGAN 60k x 128 patches (6 passes over a 1.28M-patch set), full CIFAR-10 probes, 25 epochs"),
}


def settings(config: ReproduceConfig) -> dict:
    """The resolved settings of the table (budget + overrides): what a rerun must match."""
    from monossl.data.sources import DEFAULT_IMAGE

    for option in ("arch", "finetune_steps"):
        if getattr(config, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} applies to imagenet-finetune only")
    if config.eval_data is not None:
        raise UserError("--eval-data applies to methods only")
    budget = BUDGETS[config.budget]
    rows = parse_rows(config.rows, ROWS)
    trunk_config_from(config.widths, None)  # validates --widths
    method = config.method or "bigan"
    train_steps = {m: (config.steps or budget.steps.get(m)) for m in (method, "supervised")}
    train_batch = {m: (config.batch_size or budget.batch.get(m) or defaults_of(m).batch_size)
                   for m in (method, "supervised")}
    out = {
        "experiment": EXPERIMENT, "method": method, "budget": budget.name, "budget_note": budget.note,
        "image": config.images or [f"builtin:{DEFAULT_IMAGE}"], "data": config.data or "cifar10",
        "seed": config.seed, "rows": rows,
        "steps": train_steps, "batch_size": train_batch, "widths": config.widths,
        "probe_subset": config.subset or budget.probe_subset,
        "probe_test_subset": config.test_subset or budget.probe_test_subset,
        "probe_epochs": config.probe_epochs or budget.probe_epochs,
        # resolved, so that a table begun before whitening was the default is refused, not mixed
        "whiten_conv1": ("cifar" in WHITEN_CONV1_ARCHS) if config.whiten_conv1 is None else config.whiten_conv1,
    }
    if method == "deepcluster":
        out["dc_patches"] = config.dc_patches or budget.dc_patches
        out["dc_epochs"] = None if config.steps else budget.dc_epochs
    return out


def pretrain_config(row: str, s: dict, row_dir: Path, config: ReproduceConfig) -> PretrainConfig:
    """The pretraining of a trained row."""
    common = dict(out=row_dir, seed=s["seed"], device=config.device, widths=s["widths"],
                  whiten_conv1=s["whiten_conv1"], progress=None if config.progress else False)
    if row == "supervised":
        return PretrainConfig(method="supervised", data=s["data"], steps=s["steps"]["supervised"],
                              batch_size=s["batch_size"]["supervised"], **common)
    method = s["method"]
    length = {}
    if method == "deepcluster":
        length = dict(num_patches=s["dc_patches"], epochs=s["dc_epochs"],
                      steps=None if s["dc_epochs"] else s["steps"][method])
    elif s["steps"][method]:
        length = dict(steps=s["steps"][method])
    return PretrainConfig(method=method, preset=row, batch_size=s["batch_size"][method], images=list(s["image"]),
                          **length, **common)


def augmentation_table(config: ReproduceConfig) -> Table:
    """Pretrain and probe the asked rows (those not done before) and write the table."""
    from monossl.data.datasets import load_pair, subset
    from monossl.eval.probe import probe
    from monossl.eval.protocols import get_protocol

    s = settings(config)
    train_set, test_set = load_pair(s["data"])
    if s["probe_subset"]:
        train_set = subset(train_set, s["probe_subset"], seed=s["seed"])
    if s["probe_test_subset"]:
        test_set = subset(test_set, s["probe_test_subset"], seed=s["seed"])
    protocol = get_protocol("cifar").with_overrides(epochs=s["probe_epochs"])
    # only now: bad input leaves no empty directory behind
    out = runs.lock_run_dir(config.out or f"runs/reproduce-{s['method']}-{config.budget}")
    check_table_settings(out, s, "reproduce.json")
    log.info(f"reproduce {EXPERIMENT}: --method {s['method']}, budget {s['budget']} ({s['budget_note']}); "
             f"{len(s['rows'])} rows -> {out}")

    def make(row: str):
        def probe_row():
            row_dir = out / row
            if row == "random":
                trunk, meta = random_trunk("cifar", s["seed"], **trunk_config_from(s["widths"], None)), \
                    {"method": "random", "seed": s["seed"]}
                save_trunk(runs.ensure_writable_dir(row_dir) / "trunk.pt", trunk, meta)
            else:
                trunk, meta = load_trunk(pretrained(pretrain_config(row, s, row_dir, config)))
            result = probe(trunk, train_set, test_set, protocol, device=config.device, seed=s["seed"],
                           progress=config.progress, verbose=config.progress, meta=meta, dataset=s["data"])
            result["seen"] = samples_seen(None if row == "random" else row_dir)
            return result
        return probe_row

    done = run_rows([Row(r, _label(r, s["method"]), out / r / probe_dir_name(protocol.name, s["data"]) / "results.json",
                          make(r)) for r in s["rows"]])
    table_config = {**s, "protocol": protocol.to_dict(), "seconds_per_row": done.seconds,
                    "seconds_this_invocation": done.seconds_this_invocation}
    md = write_table(out, s["rows"], done.results, done.stopped, table_config)
    return Table(out, md, done.stopped, ("table.md", "table.csv", "results.json", "table.png"))


# ---------------------------------------------------------------------------- the table


def _label(row: str, method: str) -> str:
    if row == "supervised":
        return "fully supervised"
    if row == "random":
        return "random features"
    return f"{method}, {row} ({paper.PRESET_TO_PAPER[row]})"


def _paper_cifar(row: str) -> dict:
    return paper.CIFAR10_BIGAN[paper.cifar10_row(row)]


def findings(values: dict) -> list[dict]:
    """The paper's four findings (issue 5) checked on {row: {tap: top1}}; a finding whose rows are
    missing has holds=None."""

    def get(row: str, tap: str):
        return values.get(row, {}).get(tap)

    out = []
    with_s = [get(r, "conv1") for r in WITH_SCALE]
    without_s = [get(r, "conv1") for r in WITHOUT_SCALE]
    ok = None if None in with_s + without_s else min(with_s) > max(without_s)
    detail = None if ok is None else f"min with scale {min(with_s):.1f} vs max without {max(without_s):.1f}"
    out.append({"finding": "every row with scale beats every row without scale at conv1", "holds": ok,
                "detail": detail})
    a, r = get("all", "conv1"), get("random", "conv1")
    out.append({"finding": "all beats random at conv1 by >= 5 points",
                "holds": None if None in (a, r) else a - r >= 5,
                "detail": None if None in (a, r) else f"all - random = {a - r:+.1f}"})
    sup, a4 = get("supervised", "conv4"), get("all", "conv4")
    out.append({"finding": "fully supervised beats all at conv4",
                "holds": None if None in (sup, a4) else sup > a4,
                "detail": None if None in (sup, a4) else f"supervised - all = {sup - a4:+.1f}"})
    n, r = get("none", "conv1"), get("random", "conv1")
    out.append({"finding": "none is within 2 points of random at conv1",
                "holds": None if None in (n, r) else abs(n - r) <= 2,
                "detail": None if None in (n, r) else f"none - random = {n - r:+.1f}"})
    # a summary of the first finding that one noisy row cannot flip (issue 11's target)
    gap = None if None in with_s + without_s else sum(with_s) / len(with_s) - sum(without_s) / len(without_s)
    out.append({"finding": "the mean conv1 of the rows with scale beats the mean of those without by >= 3 points",
                "holds": None if gap is None else gap >= 3,
                "detail": None if gap is None else f"mean with scale - mean without = {gap:+.1f}"})
    return out


def _mark(holds: bool | None) -> str:
    return {True: "holds", False: "does NOT hold", None: "not checked (rows missing)"}[holds]


def write_table(out: Path, rows: list[str], results: dict, stopped: dict, config: dict) -> str:
    from monossl.viz.plots import write_layer_bars

    table = cells(results, rows, TAPS, _paper_cifar)
    ours = {r: {t: c["ours"] for t, c in v.items()} for r, v in table.items()}
    paper_values = {r: {t: c["paper"] for t, c in v.items()} for r, v in table.items()}
    method = config["method"]

    header = ["training data"] + [f"{t} ours (paper, diff)" for t in TAPS] + ["samples seen"]
    body = cell_rows(rows, TAPS, table, stopped, lambda r: f"{_label(r, method)} [paper: {paper.cifar10_row(r)}]",
                     _paper_cifar)
    body = [line + [seen_text(results[r].get("seen")) if r in results else ""] for r, line in zip(rows, body)]
    ours_found = findings(ours)
    paper_found = findings({r: _paper_cifar(r) for r in ROWS})
    proto = config["protocol"]
    lines = [
        f"CIFAR-10 augmentation table (PAPER.md section 5), `--method {method}`, budget `{config['budget']}`: "
        f"linear-probe top-1 (%), final epoch, protocol `{proto['name']}` ({proto['epochs']} epochs), "
        f"probe data {config['data']} ({config['probe_subset'] or 'all'} train / "
        f"{config['probe_test_subset'] or 'all'} test images), image {', '.join(config['image'])}, "
        f"seed {config['seed']}. Each cell: ours (the paper's, ours - paper).",
        "",
    ]
    if method != "bigan":
        lines += [f"The paper's numbers are its BiGAN table; it has no CIFAR-10 table for {method}.", ""]
    lines += [runs.markdown_table(header, body).rstrip("\n"), "", "The paper's findings in our numbers:", ""]
    for f_ours, f_paper in zip(ours_found, paper_found):
        detail = f" ({f_ours['detail']})" if f_ours["detail"] else ""
        lines.append(f"- {f_ours['finding']}: {_mark(f_ours['holds'])}{detail}; "
                     f"in the paper: {_mark(f_paper['holds'])}")
    for row, message in stopped.items():
        lines += ["", f"Row `{row}` stopped: {message}"]
    md = "\n".join(lines) + "\n"

    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv", cells_csv(rows, TAPS, table, results, stopped, paper.cifar10_row, _paper_cifar))
    runs.write_json(out / "results.json", {
        "title": f"CIFAR-10 augmentation table, {method}, budget {config['budget']}",
        "config": config,
        "table": table,
        "paper_rows": {r: paper.cifar10_row(r) for r in rows},
        "stopped": stopped,
        "findings": ours_found,
        "paper_findings": paper_found,
        "rows": {r: {k: results[r].get(k) for k in ("taps", "trunk", "n_train", "n_test", "timings", "row_seconds")}
                 for r in rows if r in results},
        "environment": runs.environment(),
    })
    labels = {r: ("fully supervised" if r == "supervised" else "random" if r == "random" else r) for r in rows}
    write_layer_bars(ours, out / "table.png", paper=paper_values, row_labels=labels,
                     title=f"CIFAR-10, {method} on one image, budget {config['budget']} (diamonds: paper)")
    return md
