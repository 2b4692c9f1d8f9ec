"""`monossl reproduce imagenet-finetune`: the paper's Table 4 (PAPER.md sections 4-5) in one command.

Four model rows on AlexNet (--arch, alexnet-big by default): full supervision (trained with the
labels of --data's train split) and BiGAN, RotNet and DeepCluster on one image's patch stream
(--image, preset `all`). Each row is pretrained (`monossl pretrain`), fine-tuned on --data with
conv1 and conv2 frozen (`monossl finetune`: weights and BatchNorm statistics kept, the rest
re-initialised and trained with labels), and probed on conv1..conv5 with the `asano-max`
protocol (ten test crops). OUT/table.md, table.csv, results.json and table.png hold ours, the
paper's number and the difference in every cell.

Row directories: OUT/<row>/ (the pretraining run) and OUT/<row>/finetune-conv1-conv2/ (the
fine-tuned trunk and its probe-asano-max/results.json). A rerun with the same settings skips
finished rows and resumes unfinished ones; other settings for the same OUT are refused. A row
whose training stops (NaN, a BiGAN discriminator that wins) is reported and the command exits 1.

Budgets (`BUDGETS`): smoke (a few steps per row, tiny probes: a check on CPU) and paper (for a
GPU; training lengths chosen here, the paper's are not all known).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from monossl import runs
from monossl.errors import UserError

EXPERIMENT = "imagenet-finetune"
ROWS = ("supervised", "bigan", "rotnet", "deepcluster")
TAPS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FROZEN = ("conv1", "conv2")
ARCHS = ("alexnet-big", "alexnet-small")
PROTOCOL = "asano-max"

#: PAPER.md section 5: ImageNet, AlexNet, fine-tuned with conv1-conv2 frozen, linear probes, 10 crops, top-1 (%)
PAPER_TABLE4 = {
    "Full supervision": {"conv1": 19.3, "conv2": 36.3, "conv3": 44.2, "conv4": 48.3, "conv5": 50.5},
    "BiGAN, image A": {"conv1": 22.5, "conv2": 37.6, "conv3": 44.2, "conv4": 47.6, "conv5": 48.3},
    "RotNet, image A": {"conv1": 22.0, "conv2": 38.2, "conv3": 44.8, "conv4": 49.2, "conv5": 51.8},
    "DeepCluster, image A": {"conv1": 21.8, "conv2": 35.9, "conv3": 43.6, "conv4": 48.8, "conv5": 50.4},
}
PAPER_ROW = {"supervised": "Full supervision", "bigan": "BiGAN, image A", "rotnet": "RotNet, image A",
             "deepcluster": "DeepCluster, image A"}


@dataclass(frozen=True)
class Budget:
    """Pretraining steps/batch per method ("supervised": epochs over --data when `supervised_epochs`);
    DeepCluster: `dc_epochs` epochs over the stream's first `dc_patches` patches; fine-tuning:
    `finetune_epochs` over --data's train split, or `finetune_steps`."""

    name: str
    steps: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    dc_patches: int = 8192
    dc_epochs: int = 1
    supervised_epochs: int | None = None
    finetune_steps: int | None = None
    finetune_epochs: int | None = None
    finetune_batch: int = 128
    train_subset: int | None = None  # class-balanced subset of --data's train split, for fine-tuning and probes
    test_subset: int | None = None  # ... and of its val split, for the probes
    probe_epochs: int | None = None  # None: the protocol's (36)
    note: str = ""


BUDGETS = {
    "smoke": Budget(
        "smoke", steps={"bigan": 2, "rotnet": 2, "supervised": 2}, batch={"bigan": 4, "rotnet": 4, "deepcluster": 8,
                                                                          "supervised": 8},
        dc_patches=16, dc_epochs=1, finetune_steps=2, finetune_batch=8, train_subset=100, test_subset=50,
        probe_epochs=1, note="a check that every piece runs on CPU; the numbers mean nothing"),
    "paper": Budget(
        "paper", steps={"bigan": 200_000, "rotnet": 200_000}, batch={"bigan": 128, "rotnet": 192, "deepcluster": 256,
                                                                    "supervised": 256},
        dc_patches=1_281_167, dc_epochs=100, supervised_epochs=90, finetune_epochs=30, finetune_batch=256,
        note="for GPUs (days at ImageNet scale); chosen here: RotNet 200k x 192 patches (30 passes over 1.28M), "
             "BiGAN 200k x 128, DeepCluster 100 epochs over 1.28M patches, supervision 90 epochs and fine-tuning "
             "30 epochs over --data's train split; probes: all of --data, 36 epochs"),
}


def settings(args) -> dict:
    """The resolved settings of the table (budget + overrides): what a rerun must match."""
    from monossl.data.datasets import parse_spec
    from monossl.data.sources import DEFAULT_IMAGE

    if args.budget not in BUDGETS:
        raise UserError(f"--budget {args.budget}: {EXPERIMENT} has budgets {', '.join(BUDGETS)}")
    for option in ("method", "widths", "whiten_conv1"):
        if getattr(args, option, None) is not None:
            raise UserError(f"--{option.replace('_', '-')} does not apply to {EXPERIMENT} (its rows are {', '.join(ROWS)} on AlexNet)")
    if not args.data:
        raise UserError(f"{EXPERIMENT} needs --data folder:PATH (an ImageNet-style train/<class>/, val/<class>/ tree)")
    if parse_spec(args.data)[0] != "folder":
        raise UserError(f"--data {args.data}: {EXPERIMENT} needs an ImageNet-style folder:PATH")
    arch = args.arch or "alexnet-big"
    if arch not in ARCHS:
        raise UserError(f"--arch {arch}: {EXPERIMENT} is for {' or '.join(ARCHS)}")
    rows = list(ROWS)
    if args.rows:
        asked = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in asked if r not in ROWS]
        if unknown or not asked:
            raise UserError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
        rows = [r for r in ROWS if r in asked]  # the paper's order
    b = BUDGETS[args.budget]
    steps = {m: args.steps or b.steps.get(m) for m in ROWS}  # None: epochs (supervised, deepcluster)
    return {
        "experiment": EXPERIMENT, "budget": b.name, "budget_note": b.note, "arch": arch,
        "image": args.image or [f"builtin:{DEFAULT_IMAGE}"], "preset": "all", "data": args.data, "seed": args.seed,
        "rows": rows, "steps": steps,
        "batch_size": {m: args.batch_size or b.batch[m] for m in ROWS},
        "dc_patches": args.dc_patches or b.dc_patches, "dc_epochs": None if steps["deepcluster"] else b.dc_epochs,
        "supervised_epochs": None if steps["supervised"] else b.supervised_epochs,
        "finetune": {"freeze": list(FROZEN), "steps": args.finetune_steps or b.finetune_steps,
                     "epochs": None if (args.finetune_steps or b.finetune_steps) else b.finetune_epochs,
                     "batch_size": args.batch_size or b.finetune_batch},
        "protocol": PROTOCOL, "train_subset": args.subset or b.train_subset,
        "test_subset": args.test_subset or b.test_subset, "probe_epochs": args.probe_epochs or b.probe_epochs,
    }


def pretrain_argv(row: str, s: dict, row_dir: Path, args) -> list[str]:
    """`monossl pretrain` options of a row."""
    argv = ["--method", row, "--arch", s["arch"], "--out", str(row_dir), "--seed", str(s["seed"]),
            "--device", args.device, "--batch-size", str(s["batch_size"][row])]
    if args.quiet:
        argv.append("--quiet")
    if (row_dir / "last.pt").exists():
        argv.append("--resume")
    if row == "supervised":
        argv += ["--data", s["data"]]
        return argv + (["--steps", str(s["steps"][row])] if s["steps"][row] else
                       ["--epochs", str(s["supervised_epochs"])])
    argv += ["--preset", s["preset"]]
    for image in s["image"]:
        argv += ["--image", image]
    if row == "deepcluster":
        argv += ["--num-patches", str(s["dc_patches"])]
        return argv + (["--steps", str(s["steps"][row])] if s["steps"][row] else ["--epochs", str(s["dc_epochs"])])
    return argv + ["--steps", str(s["steps"][row])]


def finetune_argv(s: dict, row_dir: Path, ft_dir: Path, args) -> list[str]:
    """`monossl finetune` options of a row."""
    ft = s["finetune"]
    argv = [str(row_dir), "--freeze", ",".join(ft["freeze"]), "--data", s["data"], "--out", str(ft_dir),
            "--batch-size", str(ft["batch_size"]), "--seed", str(s["seed"]), "--device", args.device,
            "--protocol", s["protocol"]]
    argv += ["--steps", str(ft["steps"])] if ft["steps"] else ["--epochs", str(ft["epochs"])]
    for option, key in (("--probe-epochs", "probe_epochs"), ("--subset", "train_subset"),
                        ("--test-subset", "test_subset")):
        if s[key]:
            argv += [option, str(s[key])]
    if args.quiet:
        argv.append("--quiet")
    if (ft_dir / "config.json").exists():
        argv.append("--resume")
    return argv


def _command(module, argv: list[str]) -> None:
    """Run a monossl command in this process (as the CLI would, errors included)."""
    parser = argparse.ArgumentParser()
    module.configure(parser)
    module.run(parser.parse_args(argv))


def run(args) -> int:
    from monossl import pretrain
    from monossl.eval import finetune

    s = settings(args)
    out = runs.lock_run_dir(args.out or f"runs/reproduce-{EXPERIMENT}-{s['budget']}")
    from monossl.experiments.reproduce import _check_same_settings

    _check_same_settings(out, s)
    print(f"reproduce {EXPERIMENT}: {s['arch']}, budget {s['budget']} ({s['budget_note']}); {len(s['rows'])} rows "
          f"-> {out}")
    results, stopped, seconds = {}, {}, {}
    t_all = time.perf_counter()
    for i, row in enumerate(s["rows"], 1):
        row_dir = out / row
        ft_dir = row_dir / f"finetune-{'-'.join(FROZEN)}"
        probe_json = ft_dir / f"probe-{PROTOCOL}" / "results.json"
        if probe_json.exists():
            results[row] = runs.read_json(probe_json, "probe result")
            seconds[row] = results[row].get("row_seconds")
            print(f"[{i}/{len(s['rows'])} {row}] done before: {probe_json}")
            continue
        print(f"[{i}/{len(s['rows'])} {row}] pretrain, fine-tune with {', '.join(FROZEN)} frozen, probe")
        t0 = time.perf_counter()
        try:
            if not (row_dir / "trunk.pt").exists():
                _command(pretrain, pretrain_argv(row, s, row_dir, args))
            _command(finetune, finetune_argv(s, row_dir, ft_dir, args))
        except UserError as exc:
            if not str(exc).startswith("training stopped"):
                raise
            stopped[row] = str(exc)
            print(f"[{row}] {exc}")
            continue
        result = runs.read_json(probe_json, "probe result")
        # the row's wall clock, kept beside its probe so that a rerun that skips the row still reports it
        result["row_seconds"] = round(time.perf_counter() - t0, 1)
        result["row_seconds_note"] = "this row's pretraining + fine-tuning + probe (this invocation only), wall clock"
        runs.write_json(probe_json, result)
        results[row], seconds[row] = result, result["row_seconds"]

    if not results:
        raise UserError("no row finished: " + "; ".join(f"{r}: {m}" for r, m in stopped.items()))
    config = {**s, "protocol": results[next(iter(results))]["protocol"], "seconds_per_row": seconds,
              "seconds_this_invocation": round(time.perf_counter() - t_all, 1)}
    md = write_table(out, s["rows"], results, stopped, config)
    print()
    print(md, end="")
    print(f"wrote {out / 'table.md'}, table.csv, results.json and table.png")
    if stopped:
        print(f"{len(stopped)} row(s) stopped: {', '.join(stopped)} (see table.md)")
        return 1
    return 0


def _paper(row: str) -> dict:
    return PAPER_TABLE4[PAPER_ROW[row]]


def write_table(out: Path, rows: list[str], results: dict, stopped: dict, config: dict) -> str:
    from monossl.experiments.reproduce import cell_rows, cells, cells_csv
    from monossl.viz.plots import write_layer_bars

    table = cells(results, rows, TAPS, _paper)
    header = ["model"] + [f"{t} ours (paper, diff)" for t in TAPS]
    body = cell_rows(rows, TAPS, table, stopped, lambda r: f"{r} [paper: {PAPER_ROW[r]}]", _paper)
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
    runs.write_text(out / "table.csv", cells_csv(rows, TAPS, table, results, stopped, PAPER_ROW.get, _paper))
    runs.write_json(out / "results.json", {
        "title": f"ImageNet fine-tuning table (conv1-conv2 frozen), {config['arch']}, budget {config['budget']}",
        "config": config,
        "table": table,
        "paper_rows": {r: PAPER_ROW[r] for r in rows},
        "stopped": stopped,
        "rows": {r: {k: results[r].get(k) for k in ("taps", "trunk", "n_train", "n_test", "num_classes", "timings",
                                                     "row_seconds")}
                 for r in rows if r in results},
        "environment": runs.environment(),
    })
    ours = {r: {t: c["ours"] for t, c in v.items()} for r, v in table.items()}
    paper = {r: {t: c["paper"] for t, c in v.items()} for r, v in table.items()}
    write_layer_bars(ours, out / "table.png", paper=paper, row_labels={r: PAPER_ROW[r] for r in rows},
                     title=f"fine-tuned with conv1-conv2 frozen, {config['arch']}, budget {config['budget']} "
                           f"(diamonds: paper)")
    return md
