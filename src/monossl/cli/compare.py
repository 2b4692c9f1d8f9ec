"""`monossl compare`: the main job (monossl.experiments.compare)."""

from __future__ import annotations

import argparse
import time

from monossl.cli import positive
from monossl.errors import UserError
from monossl.experiments.compare import (
    DEFAULT_METHOD,
    MAIN_ROWS,
    REFERENCE_EPOCHS,
    REFERENCE_ROWS,
    CompareConfig,
    compare,
)


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"want comma-separated integer seeds like 0,1,2, got {text!r}")
    return seeds


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="cifar10", help="labelled dataset for probes and supervision (default cifar10)")
    p.add_argument("--method", default=DEFAULT_METHOD,
                   help=f"self-supervised method of the image and full rows (default {DEFAULT_METHOD})")
    p.add_argument("--image", default=None, help="the one image (default: the built-in default image)")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--rows", default=None,
                   help=f"comma-separated rows among {', '.join(MAIN_ROWS)} (and {', '.join(REFERENCE_ROWS)} "
                        "with --references; default: all of them)")
    p.add_argument("--widths", default=None, help="CIFAR trunk channels, e.g. 64,128,256,512 (default: the trunk's)")
    p.add_argument("--conv1-kernel", type=positive(), default=None,
                   help="CIFAR trunk conv1 kernel (default: the trunk's)")
    p.add_argument("--no-whiten-conv1", dest="whiten_conv1", action="store_false", default=None,
                   help="train conv1 in plain pixel coordinates (default: whitened by each row's own data)")
    p.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    p.add_argument("--seed", type=int, default=0, help="the seed of a one-seed table (default 0)")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="several seeds, e.g. 0,1,2: each seed's table in OUT/seed-K, mean ± sd in OUT")
    p.add_argument("--references", choices=list(REFERENCE_EPOCHS), default=None,
                   help="add converged full-data and supervised rows ("
                        + "; ".join(f"{b}: {', '.join(f'{r} {e} epochs' for r, e in rows.items())}"
                                    for b, rows in REFERENCE_EPOCHS.items())
                        + "), trained once under --reference-dir with learning curves and reused")
    p.add_argument("--reference-seeds", type=seed_list, default=None,
                   help="seeds that get the converged references (default: the first seed)")
    p.add_argument("--reference-dir", default=None, help="where converged references live (default: "
                   "references/ beside --out)")
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


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.seeds is not None and args.seed != 0:
        raise UserError("give --seed or --seeds, not both")
    table = compare(CompareConfig(
        data=args.data, method=args.method, image=args.image, preset=args.preset, rows=args.rows,
        widths=args.widths, conv1_kernel=args.conv1_kernel, whiten_conv1=args.whiten_conv1, out=args.out,
        seed=args.seed, seeds=args.seeds or [], references=args.references, reference_seeds=args.reference_seeds,
        reference_dir=args.reference_dir, steps=args.steps, supervised_steps=args.supervised_steps,
        probe_epochs=args.probe_epochs, subset=args.subset, test_subset=args.test_subset, device=args.device,
        progress=not args.quiet))
    print()
    print(table.markdown, end="")
    print(f"wrote {table.out / table.files[0]}, {', '.join(table.files[1:])} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0
