"""The paper's Table 4 (PAPER.md sections 4-5), `finetune_table(ReproduceConfig) -> Table`
(`monossl reproduce imagenet-finetune`).

Four model rows on AlexNet (--arch, alexnet-big by default): full supervision (trained with the
labels of --data's train split) and BiGAN, RotNet and DeepCluster on one image's patch stream
(--image, preset `all`). Each row is pretrained (monossl.pretrain), fine-tuned on --data with
conv1 and conv2 frozen (eval.finetune: weights and BatchNorm statistics kept, the rest
re-initialised and trained with labels), and probed on conv1..conv5 with the `asano-max`
protocol (ten test crops). OUT/table.md, table.csv, results.json and table.png hold ours, the
paper's number and the difference in every cell.

Row directories: OUT/<row>/ (the pretraining run) and OUT/<row>/finetune-conv1-conv2/ (the
fine-tuned trunk and its probe-asano-max/results.json). Reruns and stopped rows: experiments/table.py.

Budgets (`BUDGETS`): smoke (a few steps per row, tiny probes: a check on CPU) and paper (for a
GPU; training lengths chosen here, the paper's are not all known).
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
)
from monossl.pretrain import PretrainConfig

log = logging.getLogger(__name__)

EXPERIMENT = "imagenet-finetune"
ROWS = ("supervised", "bigan", "rotnet", "deepcluster")
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FROZEN = ("conv1", "conv2")
ARCHS = ("alexnet-big", "alexnet-small")
PROTOCOL = "asano-max"
FINETUNE_DIR = f"finetune-{'-'.join(FROZEN)}"


BUDGETS = {
    "smoke": Budget(
        "smoke", steps={"bigan": 2, "rotnet": 2, "supervised": 2}, batch={"bigan": 4, "rotnet": 4, "deepcluster": 8,
                                                                          "supervised": 8},
        dc_patches=16, dc_epochs=1, finetune_steps=2, finetune_batch=8, probe_subset=100, probe_test_subset=50,
        probe_epochs=1, note="a check that every piece runs on CPU; the numbers mean nothing"),
    "paper": Budget(
        "paper", steps={"bigan": 200_000, "rotnet": 200_000}, batch={"bigan": 128, "rotnet": 192, "deepcluster": 256,
                                                                    "supervised": 256},
        dc_patches=1_281_167, dc_epochs=100, supervised_epochs=90, finetune_epochs=30, finetune_batch=256,
        note="for GPUs (days at ImageNet scale); chosen here: RotNet 200k x 192 patches (30 passes over 1.28M), "
             "BiGAN 200k x 128, DeepCluster 100 epochs over 1.28M patches, supervision 90 epochs and fine-tuning "
             "30 epochs over --data's train split; probes: all of --data, 36 epochs"),
}


def settings(config: ReproduceConfig) -> dict:
    """The resolved settings of the table (budget + overrides): what a rerun must match. The budget's
    probe subsets are also what the rows are fine-tuned on."""
    from monossl.data.datasets import parse_spec
    from monossl.data.sources import DEFAULT_IMAGE

    if config.budget not in BUDGETS:
        raise UserError(f"--budget {config.budget}: {EXPERIMENT} has budgets {', '.join(BUDGETS)}")
    for option in ("method", "widths", "whiten_conv1", "eval_data"):
        if getattr(config, option) is not None:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {EXPERIMENT} (its rows are "
                            f"{', '.join(ROWS)} on AlexNet)")
    if not config.data:
        raise UserError(f"{EXPERIMENT} needs --data folder:PATH (an ImageNet-style train/<class>/, val/<class>/ tree)")
    if parse_spec(config.data)[0] != "folder":
        raise UserError(f"--data {config.data}: {EXPERIMENT} needs an ImageNet-style folder:PATH")
    arch = config.arch or "alexnet-big"
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: {EXPERIMENT} is for {' or '.join(ARCHS)}")
    b = BUDGETS[config.budget]
    steps = {m: config.steps or b.steps.get(m) for m in ROWS}  # None: epochs (supervised, deepcluster)
    finetune_steps = config.finetune_steps or b.finetune_steps
    return {
        "experiment": EXPERIMENT, "budget": b.name, "budget_note": b.note, "arch": arch,
        "image": config.images or [f"builtin:{DEFAULT_IMAGE}"], "preset": "all", "data": config.data,
        "seed": config.seed, "rows": parse_rows(config.rows, ROWS), "steps": steps,
        "batch_size": {m: config.batch_size or b.batch[m] for m in ROWS},
        "dc_patches": config.dc_patches or b.dc_patches, "dc_epochs": None if steps["deepcluster"] else b.dc_epochs,
        "supervised_epochs": None if steps["supervised"] else b.supervised_epochs,
        "finetune": {"freeze": list(FROZEN), "steps": finetune_steps,
                     "epochs": None if finetune_steps else b.finetune_epochs,
                     "batch_size": config.batch_size or b.finetune_batch},
        "protocol": PROTOCOL, "train_subset": config.subset or b.probe_subset,
        "test_subset": config.test_subset or b.probe_test_subset, "probe_epochs": config.probe_epochs or b.probe_epochs,
    }


def pretrain_config(row: str, s: dict, row_dir: Path, config: ReproduceConfig) -> PretrainConfig:
    """The pretraining of a row."""
    common = dict(method=row, arch=s["arch"], out=row_dir, seed=s["seed"], device=config.device,
                  batch_size=s["batch_size"][row], progress=None if config.progress else False)
    if row == "supervised":
        return PretrainConfig(data=s["data"], steps=s["steps"][row],
                              epochs=None if s["steps"][row] else s["supervised_epochs"], **common)
    common.update(preset=s["preset"], images=list(s["image"]))
    if row == "deepcluster":
        return PretrainConfig(num_patches=s["dc_patches"], steps=s["steps"][row],
                              epochs=None if s["steps"][row] else s["dc_epochs"], **common)
    return PretrainConfig(steps=s["steps"][row], **common)


def finetune_config(s: dict, row_dir: Path, ft_dir: Path, config: ReproduceConfig):
    """The fine-tuning of a row (resumed when its directory holds one)."""
    from monossl.eval.finetune import FinetuneConfig

    ft = s["finetune"]
    return FinetuneConfig(
        run_dir=row_dir, freeze=",".join(ft["freeze"]), data=s["data"], out=ft_dir, batch_size=ft["batch_size"],
        seed=s["seed"], device=config.device, protocol=s["protocol"], steps=ft["steps"], epochs=ft["epochs"],
        probe_epochs=s["probe_epochs"], subset=s["train_subset"], test_subset=s["test_subset"],
        progress=None if config.progress else False, resume=(ft_dir / "config.json").exists())


def finetune_table(config: ReproduceConfig) -> Table:
    """Pretrain, fine-tune and probe the asked rows (those not done before) and write the table."""
    from monossl.eval.finetune import finetune

    s = settings(config)
    out = runs.lock_run_dir(config.out or f"runs/reproduce-{EXPERIMENT}-{s['budget']}")
    check_table_settings(out, s, "reproduce.json")
    log.info(f"reproduce {EXPERIMENT}: {s['arch']}, budget {s['budget']} ({s['budget_note']}); {len(s['rows'])} rows "
             f"-> {out}")

    def make(row: str):
        def finetune_row():
            row_dir = pretrained(pretrain_config(row, s, out / row, config))
            return finetune(finetune_config(s, row_dir, row_dir / FINETUNE_DIR, config))
        return finetune_row

    probe_dir = probe_dir_name(PROTOCOL, s["data"])
    rows = [Row(r, f"pretrain, fine-tune with {', '.join(FROZEN)} frozen, probe",
                out / r / FINETUNE_DIR / probe_dir / "results.json", make(r)) for r in s["rows"]]
    done = run_rows(rows)
    first = done.results[next(iter(done.results))]
    table_config = {**s, "protocol": first["protocol"], "seconds_per_row": done.seconds,
                    "seconds_this_invocation": done.seconds_this_invocation}
    md = write_table(out, s["rows"], done.results, done.stopped, table_config)
    return Table(out, md, done.stopped, ("table.md", "table.csv", "results.json", "table.png"))


def _paper(row: str) -> dict:
    return paper.IMAGENET_FINETUNE[paper.FINETUNE_ROW_TO_PAPER[row]]


def write_table(out: Path, rows: list[str], results: dict, stopped: dict, config: dict) -> str:
    from monossl.viz.plots import write_layer_bars

    table = cells(results, rows, TAPS, _paper)
    header = ["model"] + [f"{t} ours (paper, diff)" for t in TAPS]
    body = cell_rows(rows, TAPS, table, stopped, lambda r: f"{r} [paper: {paper.FINETUNE_ROW_TO_PAPER[r]}]", _paper)
    ft, proto = config["finetune"], config["protocol"]
    length = f"{ft['steps']} steps" if ft["steps"] else f"{ft['epochs']} epochs"
    first = results[next(iter(results))]
    lines = [
        (f"ImageNet fine-tuning table (PAPER.md section 5, Table 4), {config['arch']}, budget `{config['budget']}`: "
         f"each model pretrained, then fine-tuned on {config['data']} with {' and '.join(ft['freeze'])} frozen "
         f"(weights and BatchNorm statistics; the rest re-initialised, {length} of {ft['batch_size']}), then linear "
         f"probes, protocol `{proto['name']}` ({proto['epochs']} epochs, {proto['test_crops']} test crops), top-1 (%) "
         f"at the final epoch on {first['n_train']} train / {first['n_test']} test images of {first['num_classes']} "
         f"classes; self-supervised rows on image {', '.join(config['image'])} (preset {config['preset']}; the "
         f"paper's image A is its own), seed {config['seed']}. Each cell: ours (the paper's, ours - paper)."),
        "",
        runs.markdown_table(header, body).rstrip("\n"),
        "",
        ("The paper's full-supervision row equals Zhang et al.'s linear probes of a supervised AlexNet (PAPER.md "
         "section 5); ours goes through the same fine-tuning as the other rows."),
    ]
    if first["num_classes"] != 1000:
        lines.append(f"--data has {first['num_classes']} classes, not ImageNet's 1000: the differences to the paper "
                     f"do not measure anything.")
    for row, message in stopped.items():
        lines += ["", f"Row `{row}` stopped: {message}"]
    md = "\n".join(lines) + "\n"

    runs.write_text(out / "table.md", md)
    runs.write_text(out / "table.csv",
                    cells_csv(rows, TAPS, table, results, stopped, paper.FINETUNE_ROW_TO_PAPER.get, _paper))
    runs.write_json(out / "results.json", {
        "title": f"ImageNet fine-tuning table (conv1-conv2 frozen), {config['arch']}, budget {config['budget']}",
        "config": config,
        "table": table,
        "paper_rows": {r: paper.FINETUNE_ROW_TO_PAPER[r] for r in rows},
        "stopped": stopped,
        "rows": {r: {k: results[r].get(k) for k in ("taps", "trunk", "n_train", "n_test", "num_classes", "timings",
                                                     "row_seconds")}
                 for r in rows if r in results},
        "environment": runs.environment(),
    })
    ours = {r: {t: c["ours"] for t, c in v.items()} for r, v in table.items()}
    paper_values = {r: {t: c["paper"] for t, c in v.items()} for r, v in table.items()}
    write_layer_bars(ours, out / "table.png", paper=paper_values,
                     row_labels={r: paper.FINETUNE_ROW_TO_PAPER[r] for r in rows},
                     title=f"fine-tuned with conv1-conv2 frozen, {config['arch']}, budget {config['budget']} "
                           f"(diamonds: paper)")
    return md
