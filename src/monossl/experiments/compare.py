"""`monossl compare`: the main job in its smallest real form.

Random trunk vs RotNet on one image vs supervised (optionally RotNet on the whole
dataset's images, the paper's "full data"), each probed with linear classifiers on
conv1..conv4 of the frozen trunk; prints and writes one table. Each row is its own run
directory under --out: a rerun skips finished rows and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from pathlib import Path

import torch

from monossl import pretrain, runs
from monossl.errors import UserError

ROWS = {
    "random": "random trunk",
    "rotnet": "RotNet, one image",
    "rotnet-full": "RotNet, full data (no labels)",
    "supervised": "supervised",
}


def configure(p: argparse.ArgumentParser) -> None:
    from monossl.cli import positive

    p.add_argument("--data", default="cifar10", help="labelled dataset for probes and supervision (default cifar10)")
    p.add_argument("--image", default=None, help="the one image (default: the built-in default image)")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--rows", default="random,rotnet,supervised",
                   help=f"comma-separated rows among {', '.join(ROWS)} (default random,rotnet,supervised)")
    p.add_argument("--widths", default=None, help="CIFAR trunk channels, e.g. 64,128,256,512 (default: the trunk's)")
    p.add_argument("--conv1-kernel", type=positive(), default=None, help="CIFAR trunk conv1 kernel (default: the trunk's)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotnet-steps", type=positive(), default=None, help="RotNet training steps (default: pretrain's)")
    p.add_argument("--supervised-steps", type=positive(), default=None, help="supervised training steps (default: pretrain's)")
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


def run(args) -> int:
    from monossl.data.datasets import load_pair, subset
    from monossl.data.sources import DEFAULT_IMAGE
    from monossl.eval.probes import get_protocol, run_probe, write_results
    from monossl.models import build_trunk, load_trunk

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows: unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    image = args.image or f"builtin:{DEFAULT_IMAGE}"
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
    settings = {k: getattr(args, k) for k in ("data", "image", "preset", "seed", "rotnet_steps", "supervised_steps",
                                               "probe_epochs", "subset", "test_subset", "widths", "conv1_kernel")}
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
            torch.manual_seed(args.seed)
            config = pretrain.trunk_config_from(args.widths, args.conv1_kernel)
            trunk, meta = build_trunk("cifar", **config), {"method": "random", "seed": args.seed}
        else:
            if not (row_dir / "trunk.pt").exists():
                argv = ["--out", str(row_dir), *common]
                if (row_dir / "last.pt").exists():
                    argv.append("--resume")
                if row.startswith("rotnet"):
                    argv += ["--method", "rotnet"]
                    argv += ["--image", image, "--preset", args.preset] if row == "rotnet" else ["--data", args.data]
                    if args.rotnet_steps:
                        argv += ["--steps", str(args.rotnet_steps)]
                else:
                    argv += ["--method", "supervised", "--data", args.data]
                    if args.supervised_steps:
                        argv += ["--steps", str(args.supervised_steps)]
                _pretrain(argv)
            trunk, meta = load_trunk(row_dir)
        result = run_probe(trunk, train_set, test_set, protocol, device=args.device, seed=args.seed,
                           out_dir=None, progress=not args.quiet, meta=meta, dataset=data_arg or args.data)
        result["compare_seconds"] = round(time.perf_counter() - t0, 1)
        write_results(probe_dir, result)
        results[row], timings[row] = result, result["compare_seconds"]

    table = write_table(out, rows, results, {
        "data": args.data, "image": image, "preset": args.preset, "seed": args.seed, "rows": rows,
        "subset": args.subset, "test_subset": args.test_subset,
        "trunk": {"widths": args.widths, "conv1_kernel": args.conv1_kernel}, "protocol": protocol.to_dict(),
        "seconds_per_row": timings,
    })
    print()
    print(table, end="")
    print(f"wrote {out / 'table.md'}, table.csv and results.json ({time.perf_counter() - started:.0f} s)")
    return 0


def write_table(out: Path, rows: list[str], results: dict, config: dict) -> str:
    taps = list(next(iter(results.values()))["taps"])
    header = ["training data"] + taps
    body = [[ROWS[r]] + [float(results[r]["taps"][t]["top1"]) for t in taps] for r in rows]
    md = ("Linear-probe top-1 (%) on each conv tap, final epoch, protocol "
          f"`{config['protocol']['name']}`, data {config['data']}, seed {config['seed']}.\n\n"
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
