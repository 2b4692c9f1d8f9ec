"""`monossl compare`: the main job (monossl.experiments.compare)."""

from __future__ import annotations

import argparse
import time

from monossl.cli import positive
from monossl.experiments.compare import DEFAULT_METHOD, ROWS, CompareConfig, compare


def configure(p: argparse.ArgumentParser) -> None:
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


def run(args) -> int:
    started = time.perf_counter()
    table = compare(CompareConfig(
        data=args.data, method=args.method, image=args.image, preset=args.preset, rows=args.rows,
        widths=args.widths, conv1_kernel=args.conv1_kernel, out=args.out, seed=args.seed, steps=args.steps,
        supervised_steps=args.supervised_steps, probe_epochs=args.probe_epochs, subset=args.subset,
        test_subset=args.test_subset, device=args.device, progress=not args.quiet))
    print()
    print(table.markdown, end="")
    print(f"wrote {table.out / table.files[0]}, {', '.join(table.files[1:])} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0
