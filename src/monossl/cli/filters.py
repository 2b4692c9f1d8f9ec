"""`monossl filters`: the conv1 filters of one or more networks, side by side (monossl.viz.filters).

Networks are named by run directories (or trunk.pt files), by `random` / `random:SEED` (a
freshly initialised trunk of `--arch`), or by `--random` (adds a random trunk from `--seed`).

With `--patterns`, each network's activation patterns (what its filters respond to in data) are
drawn beside its filters. The data, per network: its own training data when its run's config.json
records it; otherwise `--pattern-data SPEC` (random trunks, a trunk.pt without its run); with
`--pattern-data-for-all`, SPEC for every network. A network with neither is an error.
"""

from __future__ import annotations

import argparse

from monossl.cli import positive
from monossl.data.datasets import SPEC_HELP
from monossl.errors import UserError
from monossl.pretrain import WHITENING_SAMPLES
from monossl.viz.figures import figure_format
from monossl.viz.filters import conv1_filters, network_patterns, spatial_coherence, write_filters
from monossl.viz.networks import Network, data_images, networks, records_training_data, sample_side, training_images

# images per network for its patterns without --pattern-samples: WHITENING_SAMPLES (what pretrain whitens
# conv1 with) of 32 px; AlexNet's 256-px samples are 64 times larger (4096 would be 3 GB), so fewer
BIG_TRUNK_SAMPLES = 256


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories or trunk.pt files (or random / random:SEED)")
    parser.add_argument("--out", default="filters.png",
                        help="figure to write: .png, .pdf or .svg (default filters.png)")
    parser.add_argument("--random", action="store_true", help="add a randomly initialised trunk (first panel)")
    parser.add_argument("--arch", default="cifar", help="architecture of random trunks (default cifar)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random trunk (default 0)")
    parser.add_argument("--scale", type=positive(), default=4, help="enlargement of each filter pixel (default 4)")
    parser.add_argument("--cols", type=positive(), default=None, help="filters per grid row (default ceil(sqrt(C)))")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--patterns", action="store_true",
                        help="draw each network's activation patterns (covariance of its training data's patches "
                             "x filter) beside its filters, on the data its run recorded")
    parser.add_argument("--pattern-data", default=None, metavar="SPEC",
                        help=f"data for the patterns of networks without recorded training data (random trunks): "
                             f"a dataset ({SPEC_HELP}) or images as --image takes (builtin:NAME, a path); "
                             f"implies --patterns")
    parser.add_argument("--pattern-data-for-all", action="store_true",
                        help="use --pattern-data for every network, also those with training data of their own")
    parser.add_argument("--pattern-samples", type=positive(), default=None, metavar="N",
                        help=f"images per network for the patterns (default {WHITENING_SAMPLES}, the ones "
                             f"pretrain whitens conv1 with; {BIG_TRUNK_SAMPLES} for AlexNet)")


def attach_pattern_images(nets: list[Network], data: str | None, for_all: bool, samples: int | None) -> None:
    """Give each network the images of its patterns: its own training data, else (or with `for_all`) `data`."""
    made = {}  # (side, count) -> images of `data`, shared by networks of the same input
    for n in nets:
        side = sample_side(n.trunk)
        count = samples or (WHITENING_SAMPLES if side <= 64 else BIG_TRUNK_SAMPLES)
        if not for_all and n.run_dir is not None and records_training_data(n.config):
            try:
                n.pattern_images, n.pattern_data = training_images(n.run_dir, count), "training data"
            except UserError as exc:
                raise UserError(f"{n.label}: its training data for the patterns: {exc}") from None
        elif data:
            key = (side, count)
            if key not in made:
                try:
                    made[key] = data_images(data, count, size=side)
                except UserError as exc:
                    raise UserError(f"--pattern-data {data}: {exc}") from None
            n.pattern_images, n.pattern_data = made[key], data
        else:
            raise UserError(f"{n.label}: no recorded training data to draw its activation patterns on; "
                            f"give --pattern-data SPEC (e.g. cifar10 or builtin:astronaut)")


def run(args: argparse.Namespace) -> int:
    figure_format(args.out)  # refuse a bad --out before loading anything
    if args.pattern_data_for_all and not args.pattern_data:
        raise UserError("--pattern-data-for-all needs --pattern-data SPEC")
    nets = networks(args.runs, random=args.random, arch=args.arch, seed=args.seed)
    if not nets:
        raise UserError("give at least one RUN directory (or --random)")
    if args.patterns or args.pattern_data:
        attach_pattern_images(nets, args.pattern_data, args.pattern_data_for_all, args.pattern_samples)
    patterns = network_patterns(nets)
    write_filters(nets, args.out, args.scale, args.cols, args.title, patterns)
    for n, pattern in zip(nets, patterns):
        f = conv1_filters(n.trunk)
        line = (f"{n.label}: {f.shape[0]} filters {f.shape[2]}x{f.shape[3]}, "
                f"spatial coherence {spatial_coherence(f):.3f}")
        if pattern is not None and n.pattern_images is not None:  # patterns come from pattern images
            line += (f"; activation patterns on {n.pattern_data} ({len(n.pattern_images)} images): "
                     f"spatial coherence {spatial_coherence(pattern):.3f}")
        print(line)
    print(f"wrote {args.out}")
    return 0
