"""`monossl filters`: the conv1 filters of one or more networks, side by side (monossl.viz.filters).

Networks are named by run directories (or trunk.pt files), by `random` / `random:SEED` (a
freshly initialised trunk of `--arch`), or by `--random` (adds a random trunk from `--seed`).
"""

from __future__ import annotations

from monossl.cli import positive
from monossl.errors import UserError
from monossl.viz.figures import figure_format
from monossl.viz.filters import conv1_filters, spatial_coherence, write_filters
from monossl.viz.networks import networks


def configure(parser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run directories or trunk.pt files (or random / random:SEED)")
    parser.add_argument("--out", default="filters.png", help="figure to write: .png, .pdf or .svg (default filters.png)")
    parser.add_argument("--random", action="store_true", help="add a randomly initialised trunk (first panel)")
    parser.add_argument("--arch", default="cifar", help="architecture of random trunks (default cifar)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random trunk (default 0)")
    parser.add_argument("--scale", type=positive(), default=4, help="enlargement of each filter pixel (default 4)")
    parser.add_argument("--cols", type=positive(), default=None, help="filters per grid row (default ceil(sqrt(C)))")
    parser.add_argument("--title", default=None, help="figure title")


def run(args) -> int:
    figure_format(args.out)  # refuse a bad --out before loading anything
    nets = networks(args.runs, random=args.random, arch=args.arch, seed=args.seed)
    if not nets:
        raise UserError("give at least one RUN directory (or --random)")
    write_filters(nets, args.out, args.scale, args.cols, args.title)
    for n in nets:
        f = conv1_filters(n.trunk)
        print(f"{n.label}: {f.shape[0]} filters {f.shape[2]}x{f.shape[3]}, spatial coherence {spatial_coherence(f):.3f}")
    print(f"wrote {args.out}")
    return 0
