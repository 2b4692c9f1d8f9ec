"""`monossl compare`: the main job, the paper's per-layer figure at CIFAR scale.

Four rows on one trunk, each probed with linear classifiers on conv1..conv4 of the frozen
trunk (the same `cifar` probe for all):

    random      the freshly initialised trunk (no training)
    image       the self-supervised method (--method) on patches of one image
    full        the same method, same budget, on the dataset's training images without labels
                (the paper's "1M images" row)
    supervised  the trunk trained with the dataset's labels, on at least as many samples as the
                one-image row saw (so supervision is not handicapped)

Prints and writes one table (table.md, table.csv, results.json), a grouped bar chart
(table.png) and the conv1 filters of every row side by side with their spatial coherence
(filters.png). Each row is its own run directory under --out: a rerun skips finished rows and
resumes an interrupted one; other settings for the same --out are refused.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from pathlib import Path

from monossl import pretrain, runs
from monossl.errors import UserError
from monossl.models import trunk_config_from

ROWS = {
    "random": "random trunk",
    "image": "one image",
    "full": "full data (no labels)",
    "supervised": "supervised",
}
#: the self-supervised method of the main job (docs/one_image.md, "The recipe")
DEFAULT_METHOD = "simclr"


def configure(p: argparse.ArgumentParser) -> None:
    from monossl.cli import positive

    p.add_argument("--data", default="cifar10", help="labelled dataset for probes and supervision (default cifar10)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"self-supervised method of the image and full rows (default {DEFAULT_METHOD})")
    p.add_argument("--image", default=None, help="the one image (default: the built-in default image)")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated rows among {', '.join(ROWS)} (default: all four)")
    p.add_argument("--widths", default=None, help="CIFAR trunk channels, e.g. 64,128,256,512 (default: the trunk's)")
    p.add_argument("--conv1-kernel", type=positive(), default=None, help="CIFAR trunk conv1 kernel (default: the trunk's)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive(), default=None, help="training steps of the image and full rows "
                   "(default: pretrain's for the method)")
    p.add_argument("--supervised-steps", type=positive(), default=None,
                   help="supervised training steps (default: as many samples as the image row)")
    p.add_argument("--probe-epochs", type=positive(), default=None, help="probe epochs (default: the protocol's)")
    p.add_argument("--subset", type=positive(), default=None,
                   help="probe on a class-balanced subset of N training images (pretraining uses all of --data)")
    p.add_argument("--test-subset", type=positive(), default=None, help="evaluate on a subset of N test images")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _pretrain(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    pretrain.configure(parser)
    pretrain.run(parser.parse_args(argv))


def supervised_steps(method: str, steps: int | None) -> int:
    """Supervised steps that show the trunk at least as many samples as `steps` of `method`
    (RotNet's four rotations and SimCLR's two views count as samples)."""
    cls = pretrain.method_class(method)
    samples = (steps or pretrain.DEFAULT_STEPS[method]) * pretrain.DEFAULT_BATCH[method] * cls.views
    return max(pretrain.DEFAULT_STEPS["supervised"], math.ceil(samples / pretrain.DEFAULT_BATCH["supervised"]))


def run(args) -> int:
    from monossl.data.datasets import load_pair, subset
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.eval.probes import get_protocol, run_probe, write_results
    from monossl.models import load_trunk

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    if args.method == "supervised" or pretrain.method_class(args.method).needs != "images":
        raise UserError(f"--method {args.method} is not self-supervised; choose one that learns from images alone")
    image = args.image or f"builtin:{DEFAULT_IMAGE}"
    sup_steps = args.supervised_steps or supervised_steps(args.method, args.steps)
    train_set, test_set = load_pair(args.data)
    if args.subset:
        train_set = subset(train_set, args.subset, seed=args.seed)
    if args.test_subset:
        test_set = subset(test_set, args.test_subset, seed=args.seed)
    protocol = get_protocol("cifar").with_overrides(epochs=args.probe_epochs)
    out = runs.lock_run_dir(args.out)  # only now: bad input leaves no empty directory behind
    trunk_options = (["--widths", args.widths] if args.widths else []) + \
        (["--conv1-kernel", str(args.conv1_kernel)] if args.conv1_kernel else [])
    common = ["--seed", str(args.seed), "--device", args.device, *trunk_options] + (["--quiet"] if args.quiet else [])
    data_arg = args.data if not args.subset else None

    # the rows of one --out must come from one set of settings: refuse to mix
    settings = {k: getattr(args, k) for k in ("data", "method", "image", "preset", "seed", "steps", "probe_epochs",
                                               "subset", "test_subset", "widths", "conv1_kernel")}
    settings["supervised_steps"] = sup_steps
    settings_path = out / "settings.json"
    if settings_path.exists():
        before = runs.read_json(settings_path, "comparison settings")
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise UserError(f"{out} holds a comparison made with other settings ({', '.join(changed)}); "
                            "use another --out")
    else:
        runs.write_json(settings_path, settings)

    started = time.perf_counter()
    results, timings = {}, {}
    for row in rows:
        row_dir = out / row
        probe_dir = row_dir / f"probe-{protocol.name}"
        t0 = time.perf_counter()
        if (probe_dir / "results.json").exists():
            print(f"[{row}] done before: {probe_dir / 'results.json'}")
            results[row] = runs.read_json(probe_dir / "results.json", "probe result")
            timings[row] = results[row].get("compare_seconds")
            continue
        print(f"[{row}] {ROWS[row]}")
        if row == "random":
            trunk, meta = random_trunk(args), {"method": "random", "seed": args.seed}
        else:
            if not (row_dir / "trunk.pt").exists():
                argv = ["--out", str(row_dir), *common]
                if (row_dir / "last.pt").exists():
                    argv.append("--resume")
                if row == "supervised":
                    argv += ["--method", "supervised", "--data", args.data, "--steps", str(sup_steps)]
                else:
                    argv += ["--method", args.method]
                    argv += ["--image", image, "--preset", args.preset] if row == "image" else ["--data", args.data]
                    if args.steps:
                        argv += ["--steps", str(args.steps)]
                _pretrain(argv)
            trunk, meta = load_trunk(row_dir)
        result = run_probe(trunk, train_set, test_set, protocol, device=args.device, seed=args.seed,
                           out_dir=None, progress=not args.quiet, meta=meta, dataset=data_arg or args.data)
        result["compare_seconds"] = round(time.perf_counter() - t0, 1)
        write_results(probe_dir, result)
        results[row], timings[row] = result, result["compare_seconds"]

    table = write_table(out, rows, results, {
        "data": args.data, "method": args.method, "image": image, "preset": args.preset, "seed": args.seed,
        "rows": rows, "steps": args.steps, "supervised_steps": sup_steps,
        "subset": args.subset, "test_subset": args.test_subset,
        "trunk": {"widths": args.widths, "conv1_kernel": args.conv1_kernel}, "protocol": protocol.to_dict(),
        "seconds_per_row": timings,
    })
    write_figures(out, rows, results, args)
    print()
    print(table, end="")
    print(f"wrote {out / 'table.md'}, table.csv, results.json, table.png and filters.png "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def random_trunk(args):
    """The random row's trunk: `torch.manual_seed(seed); build_trunk(...)`, without touching the global RNG."""
    from monossl.viz.filters import random_network

    return random_network("cifar", args.seed, **trunk_config_from(args.widths, args.conv1_kernel)).trunk


def row_labels(method: str) -> dict[str, str]:
    return {"random": "random", "image": f"one image ({method})", "full": f"full data ({method})",
            "supervised": "supervised"}


def write_figures(out: Path, rows: list[str], results: dict, args) -> None:
    """table.png (grouped bars per layer) and filters.png (conv1 of every row, spatial coherence)."""
    from monossl.models import load_trunk
    from monossl.viz.filters import Network, write_filters
    from monossl.viz.plots import write_layer_bars

    labels = row_labels(args.method)
    table = {r: {t: v["top1"] for t, v in results[r]["taps"].items()} for r in rows}
    write_layer_bars(table, out / "table.png", title=f"{args.data}, seed {args.seed}", row_labels=labels)
    networks = []
    for r in rows:
        if r == "random":
            trunk = random_trunk(args)
        else:
            trunk = load_trunk(out / r)[0].eval()
        networks.append(Network(labels[r], trunk))
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
