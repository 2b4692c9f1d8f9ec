"""`monossl reproduce cifar10-augmentations`: the paper's CIFAR-10 augmentation table in one command.

(`monossl reproduce imagenet-finetune`, the paper's Table 4, lives in finetune_table.py; `run`
dispatches to it.)

Ten rows (PAPER.md §5): fully supervised, random features, and one self-supervised run per
augmentation preset of the patch stream (none, jitter, rotation, scale, rotation+jitter,
rotation+scale, jitter+scale, all) on one image (the built-in default unless --image), with
--method bigan (the paper's table), rotnet or deepcluster. Each row is its own run directory
under --out (OUT/<row>/, the probe in OUT/<row>/probe-cifar/); conv1..conv4 of every trunk are
probed with the `cifar` protocol. Writes OUT/table.md, table.csv, results.json (ours, the
paper's number and the difference in every cell, and the paper's four findings checked on
our numbers) and table.png (grouped bars, the paper's numbers as black diamonds).

A rerun with the same options skips finished rows (their probe results exist) and resumes
unfinished ones from their last checkpoint; other options for the same --out are refused.
A row whose training stops (NaN, a BiGAN discriminator that wins outright) is reported as
stopped, the others still run, and the command exits with status 1.

Budgets (`BUDGETS`, see docs/bigan.md for how `quick` was sized):
    smoke  minutes on CPU: a few steps per row, probes on 1000/500 CIFAR images for 2 epochs;
    quick  the whole table for one method in about an hour on 2 CPU cores;
    paper  the paper's scale, for a GPU (pretraining sizes chosen here; full CIFAR-10 probes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from monossl import pretrain, runs
from monossl.errors import UserError
from monossl.models import trunk_config_from
from monossl.experiments.compare import _pretrain

EXPERIMENTS = ("cifar10-augmentations", "imagenet-finetune")
SSL_METHODS = ("bigan", "rotnet", "deepcluster", "simclr")
#: the patch-stream presets, in the paper's row order
PRESET_ROWS = ("none", "jitter", "rotation", "scale", "rotation+jitter", "rotation+scale", "jitter+scale", "all")
ROWS = ("supervised", "random", *PRESET_ROWS)
TAPS = ("conv1", "conv2", "conv3", "conv4")
WITH_SCALE = tuple(r for r in PRESET_ROWS if "scale" in r or r == "all")
WITHOUT_SCALE = tuple(r for r in PRESET_ROWS if r not in WITH_SCALE)


@dataclass(frozen=True)
class Budget:
    """How much of everything one table gets. steps/batch: per method (and "supervised");
    DeepCluster trains `dc_epochs` epochs over the stream's first `dc_patches` patches."""

    name: str
    steps: dict = field(default_factory=dict)
    batch: dict = field(default_factory=dict)
    dc_patches: int = 8192
    dc_epochs: int = 4
    probe_subset: int | None = None  # class-balanced subset of the probe's training images
    probe_test_subset: int | None = None
    probe_epochs: int | None = None  # None: the protocol's (25)
    note: str = ""


BUDGETS = {
    "smoke": Budget(
        "smoke",
        steps={"bigan": 6, "rotnet": 6, "simclr": 6, "supervised": 6},
        batch={"bigan": 16, "rotnet": 16, "simclr": 16, "deepcluster": 32, "supervised": 32},
        dc_patches=256, dc_epochs=2, probe_subset=1000, probe_test_subset=500, probe_epochs=2,
        note="a check that every piece runs; the numbers mean nothing"),
    "quick": Budget(
        "quick",
        # SimCLR: 600 x 64 images x 2 views, as many samples as RotNet's 600 x 32 x 4 rotations
        steps={"bigan": 400, "rotnet": 600, "simclr": 600, "supervised": 500},
        batch={"bigan": 32, "rotnet": 32, "simclr": 64, "deepcluster": 64, "supervised": 128},
        dc_patches=8192, dc_epochs=8, probe_subset=10000, probe_test_subset=2000, probe_epochs=15,
        note="the whole table for one method in about an hour on 2 CPU cores (estimate in docs/bigan.md)"),
    "paper": Budget(
        "paper",
        steps={"bigan": 60000, "rotnet": 30000, "simclr": 30000, "supervised": 15600},
        batch={"bigan": 128, "rotnet": 192, "simclr": 256, "deepcluster": 256, "supervised": 128},
        dc_patches=100_000, dc_epochs=30, probe_subset=None, probe_test_subset=None, probe_epochs=None,
        note="the paper's scale, for a GPU; pretraining sizes chosen here (the paper's CIFAR schedule is not "
             "known): BiGAN 60k x 128 patches (6 passes over a 1.28M-patch set), full CIFAR-10 probes, 25 epochs"),
}


def configure(p: argparse.ArgumentParser) -> None:
    from monossl.cli import positive

    p.add_argument("experiment", choices=EXPERIMENTS,
                   help="which table (PAPER.md section 5): cifar10-augmentations, or imagenet-finetune (Table 4)")
    p.add_argument("--method", default=None, choices=SSL_METHODS,
                   help="cifar10-augmentations: self-supervised method of the eight augmentation rows "
                        "(default bigan, the paper's)")
    p.add_argument("--budget", default="smoke", choices=tuple(BUDGETS),
                   help="smoke (minutes, a check), quick (about 1 h on 2 CPU cores; cifar10-augmentations only), "
                        "paper (GPU); default smoke")
    p.add_argument("--image", action="append", default=None,
                   help="source image of the self-supervised rows (default: the built-in default image)")
    p.add_argument("--data", default=None,
                   help="labelled dataset for probes and the supervised row (default cifar10); "
                        "imagenet-finetune needs folder:PATH (train/<class>/, val/<class>/)")
    p.add_argument("--arch", default=None, help="imagenet-finetune: alexnet-big (default) or alexnet-small")
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce-METHOD-BUDGET, "
                                               "runs/reproduce-imagenet-finetune-BUDGET)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of the rows (cifar10-augmentations: "
                                                f"{', '.join(ROWS)}; imagenet-finetune: supervised, bigan, rotnet, "
                                                f"deepcluster); default all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # overrides of the budget (tests, quick experiments); recorded in results.json
    p.add_argument("--steps", type=positive(), default=None, help="override the budget: training steps of every trained row")
    p.add_argument("--batch-size", type=positive(), default=None, help="override the budget: batch size of every trained row")
    p.add_argument("--probe-epochs", type=positive(), default=None, help="override the budget: probe epochs")
    p.add_argument("--subset", type=positive(), default=None, help="override the budget: probe training images")
    p.add_argument("--test-subset", type=positive(), default=None, help="override the budget: probe test images")
    p.add_argument("--widths", default=None, help="CIFAR trunk channels, e.g. 64,128,256,512 (default: the trunk's)")
    p.add_argument("--whiten-conv1", action=argparse.BooleanOptionalAction, default=None,
                   help="trained rows: conv1 in whitened coordinates (default: pretrain's, on for the CIFAR trunk)")
    p.add_argument("--finetune-steps", type=positive(), default=None,
                   help="imagenet-finetune: override the budget's fine-tuning steps")
    p.add_argument("--dc-patches", type=positive(), default=None, help=argparse.SUPPRESS)


def settings(args) -> dict:
    """The resolved settings of the table (budget + overrides): what a rerun must match."""
    from monossl.data.sources import DEFAULT_IMAGE

    for option in ("arch", "finetune_steps"):
        if getattr(args, option, None) is not None:
            raise UserError(f"--{option.replace('_', '-')} applies to imagenet-finetune only")
    budget = BUDGETS[args.budget]
    rows = list(ROWS)
    if args.rows:
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in rows if r not in ROWS]
        if unknown or not rows:
            raise UserError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
        rows = [r for r in ROWS if r in rows]  # the paper's order
    trunk_config_from(args.widths, None)  # validates --widths
    method = args.method or "bigan"
    train_steps = {m: (args.steps or budget.steps.get(m)) for m in (method, "supervised")}
    train_batch = {m: (args.batch_size or budget.batch.get(m) or pretrain.DEFAULT_BATCH.get(m, 64))
                   for m in (method, "supervised")}
    out = {
        "experiment": args.experiment, "method": method, "budget": budget.name, "budget_note": budget.note,
        "image": args.image or [f"builtin:{DEFAULT_IMAGE}"], "data": args.data or "cifar10", "seed": args.seed,
        "rows": rows,
        "steps": train_steps, "batch_size": train_batch, "widths": args.widths,
        "probe_subset": args.subset or budget.probe_subset,
        "probe_test_subset": args.test_subset or budget.probe_test_subset,
        "probe_epochs": args.probe_epochs or budget.probe_epochs,
        # resolved, so that a table begun before whitening was the default is refused, not mixed
        "whiten_conv1": ("cifar" in pretrain.WHITEN_CONV1_ARCHS) if args.whiten_conv1 is None else args.whiten_conv1,
    }
    if method == "deepcluster":
        out["dc_patches"] = args.dc_patches or budget.dc_patches
        out["dc_epochs"] = None if args.steps else budget.dc_epochs
    return out


def _row_argv(row: str, s: dict, row_dir: Path, args) -> list[str]:
    """`monossl pretrain` options of a trained row."""
    argv = ["--out", str(row_dir), "--seed", str(s["seed"]), "--device", args.device]
    if s["widths"]:
        argv += ["--widths", s["widths"]]
    argv.append("--whiten-conv1" if s["whiten_conv1"] else "--no-whiten-conv1")
    if args.quiet:
        argv.append("--quiet")
    if (row_dir / "last.pt").exists():
        argv.append("--resume")
    if row == "supervised":
        return argv + ["--method", "supervised", "--data", s["data"], "--steps", str(s["steps"]["supervised"]),
                       "--batch-size", str(s["batch_size"]["supervised"])]
    method = s["method"]
    argv += ["--method", method, "--preset", row, "--batch-size", str(s["batch_size"][method])]
    for image in s["image"]:
        argv += ["--image", image]
    if method == "deepcluster":
        argv += ["--num-patches", str(s["dc_patches"])]
        argv += ["--epochs", str(s["dc_epochs"])] if s["dc_epochs"] else ["--steps", str(s["steps"][method])]
    elif s["steps"][method]:
        argv += ["--steps", str(s["steps"][method])]
    return argv


def _check_same_settings(out: Path, s: dict) -> None:
    path = out / "reproduce.json"
    if path.exists():
        previous = runs.read_json(path, "reproduce settings")
        # --rows may differ (a table can be run a few rows at a time); everything else must match
        changed = [k for k in s if k != "rows" and json.dumps(previous.get(k)) != json.dumps(s[k])]
        if changed:
            raise UserError(f"{out} holds a reproduce run with other settings ({', '.join(changed)}); "
                            f"rerun with the same options to resume it, or choose another --out")
    else:
        runs.write_json(path, s)


def run(args) -> int:
    from monossl.data.datasets import load_pair, subset
    from monossl.eval.probes import get_protocol, run_probe, write_results
    from monossl.models import build_trunk, load_trunk, save_trunk

    if args.experiment == "imagenet-finetune":
        from monossl.experiments import finetune_table

        return finetune_table.run(args)
    s = settings(args)
    train_set, test_set = load_pair(s["data"])
    if s["probe_subset"]:
        train_set = subset(train_set, s["probe_subset"], seed=s["seed"])
    if s["probe_test_subset"]:
        test_set = subset(test_set, s["probe_test_subset"], seed=s["seed"])
    protocol = get_protocol("cifar").with_overrides(epochs=s["probe_epochs"])
    # only now: bad input leaves no empty directory behind
    out = runs.lock_run_dir(args.out or f"runs/reproduce-{s['method']}-{args.budget}")
    _check_same_settings(out, s)
    print(f"reproduce {s['experiment']}: --method {s['method']}, budget {s['budget']} ({BUDGETS[s['budget']].note}); "
          f"{len(s['rows'])} rows -> {out}")

    results, stopped, seconds = {}, {}, {}
    t_all = time.perf_counter()
    for i, row in enumerate(s["rows"], 1):
        row_dir = out / row
        probe_dir = row_dir / f"probe-{protocol.name}"
        if (probe_dir / "results.json").exists():
            results[row] = runs.read_json(probe_dir / "results.json", "probe result")
            seconds[row] = results[row].get("row_seconds")
            print(f"[{i}/{len(s['rows'])} {row}] done before: {probe_dir / 'results.json'}")
            continue
        print(f"[{i}/{len(s['rows'])} {row}] {_label(row, s['method'])}")
        t0 = time.perf_counter()
        if row == "random":
            torch.manual_seed(s["seed"])
            trunk = build_trunk("cifar", **trunk_config_from(s["widths"], None))
            meta = {"method": "random", "seed": s["seed"]}
            row_dir.mkdir(parents=True, exist_ok=True)
            save_trunk(row_dir / "trunk.pt", trunk, meta)
        else:
            if not (row_dir / "trunk.pt").exists():
                try:
                    _pretrain(_row_argv(row, s, row_dir, args))
                except UserError as exc:
                    if not str(exc).startswith("training stopped"):
                        raise
                    stopped[row] = str(exc)
                    print(f"[{row}] {exc}")
                    continue
                if not (row_dir / "trunk.pt").exists():  # pretraining stopped early (should not happen here)
                    stopped[row] = "pretraining did not finish"
                    continue
            trunk, meta = load_trunk(row_dir)
        result = run_probe(trunk, train_set, test_set, protocol, device=args.device, seed=s["seed"], out_dir=None,
                           progress=not args.quiet, verbose=not args.quiet, meta=meta, dataset=s["data"])
        result["row_seconds"] = round(time.perf_counter() - t0, 1)
        result["row_seconds_note"] = "this row's pretraining (this invocation only) + probe, wall clock"
        write_results(probe_dir, result)
        results[row], seconds[row] = result, result["row_seconds"]

    if not results:
        raise UserError("no row finished: " + "; ".join(f"{r}: {m}" for r, m in stopped.items()))
    config = {**s, "protocol": protocol.to_dict(), "seconds_per_row": seconds,
              "seconds_this_invocation": round(time.perf_counter() - t_all, 1)}
    md = write_table(out, s["rows"], results, stopped, config)
    print()
    print(md, end="")
    print(f"wrote {out / 'table.md'}, table.csv, results.json and table.png")
    if stopped:
        print(f"{len(stopped)} row(s) stopped: {', '.join(stopped)} (see table.md)")
        return 1
    return 0


# ---------------------------------------------------------------------------- the table


def _label(row: str, method: str) -> str:
    from monossl.viz.report import PRESET_TO_PAPER

    if row == "supervised":
        return "fully supervised"
    if row == "random":
        return "random features"
    return f"{method}, {row} ({PRESET_TO_PAPER[row]})"


def paper_row(row: str) -> str:
    """The paper's row name of one of our rows (PAPER.md section 5)."""
    from monossl.viz.report import PRESET_TO_PAPER

    return {"supervised": "Fully supervised", "random": "Random features"}.get(row) or PRESET_TO_PAPER[row]


def cells(results: dict, rows: list[str], taps=TAPS, paper_of=None) -> dict:
    """{row: {tap: {"ours", "paper", "diff"}}} for the rows with results; paper_of(row) -> {tap: the
    paper's top-1} (default: this table's, from the paper's BiGAN table)."""
    paper_of = paper_of or _paper_cifar
    table = {}
    for row in rows:
        if row not in results:
            continue
        paper = paper_of(row)
        table[row] = {}
        for tap in taps:
            ours = float(results[row]["taps"][tap]["top1"])
            table[row][tap] = {"ours": ours, "paper": paper[tap], "diff": round(ours - paper[tap], 2)}
    return table


def cell_rows(rows, taps, table: dict, stopped: dict, label_of, paper_of) -> list[list[str]]:
    """Markdown table body: `ours (paper, diff)` per tap, or `stopped|not run (paper)` for rows without results."""
    body = []
    for row in rows:
        if row in table:
            body.append([label_of(row)] + [f"{c['ours']:.1f} ({c['paper']:.1f}, {c['diff']:+.1f})"
                                           for c in table[row].values()])
        else:
            why = "stopped" if row in stopped else "not run"
            body.append([label_of(row)] + [f"{why} ({paper_of(row)[t]:.1f})" for t in taps])
    return body


def cells_csv(rows, taps, table: dict, results: dict, stopped: dict, paper_name, paper_of) -> str:
    """table.csv: one line per row and tap (ours, paper, diff, top-5, best epoch, pooled size, status)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["row", "paper_row", "tap", "ours", "paper", "diff", "top5", "best_top1", "best_epoch",
                     "pooled_size", "status"])
    for row in rows:
        for tap in taps:
            if row in table:
                v, c = results[row]["taps"][tap], table[row][tap]
                writer.writerow([row, paper_name(row), tap, c["ours"], c["paper"], c["diff"], v["top5"],
                                 v["best_top1"], v["best_epoch"], v["pooled_size"], "done"])
            else:
                writer.writerow([row, paper_name(row), tap, "", paper_of(row)[tap], "", "", "", "", "",
                                 "stopped" if row in stopped else "not run"])
    return buf.getvalue()


def _paper_cifar(row: str) -> dict:
    from monossl.viz.report import PAPER_CIFAR10_BIGAN

    return PAPER_CIFAR10_BIGAN[paper_row(row)]


def findings(values: dict) -> list[dict]:
    """The paper's four findings (issue 5) checked on {row: {tap: top1}}; a finding whose rows are
    missing has holds=None."""

    def get(row, tap):
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


def _mark(holds) -> str:
    return {True: "holds", False: "does NOT hold", None: "not checked (rows missing)"}[holds]


def write_table(out: Path, rows: list[str], results: dict, stopped: dict, config: dict) -> str:
    from monossl.viz.plots import write_layer_bars

    table = cells(results, rows)
    ours = {r: {t: c["ours"] for t, c in v.items()} for r, v in table.items()}
    paper_values = {r: {t: c["paper"] for t, c in v.items()} for r, v in table.items()}
    method = config["method"]

    header = ["training data"] + [f"{t} ours (paper, diff)" for t in TAPS]
    body = cell_rows(rows, TAPS, table, stopped, lambda r: f"{_label(r, method)} [paper: {paper_row(r)}]",
                     _paper_cifar)
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
    runs.write_text(out / "table.csv", cells_csv(rows, TAPS, table, results, stopped, paper_row, _paper_cifar))
    runs.write_json(out / "results.json", {
        "title": f"CIFAR-10 augmentation table, {method}, budget {config['budget']}",
        "config": config,
        "table": table,
        "paper_rows": {r: paper_row(r) for r in rows},
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
