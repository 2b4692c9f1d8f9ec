"""`monossl probe RUN_DIR | --random`: linear probes on every conv tap of a frozen trunk.

Parses the options, loads (or, with --random, builds) the trunk and the labelled data, and
calls `monossl.eval.probe.probe`, which prints the table and writes OUT/results.{json,md}
(OUT defaults to RUN_DIR/probe-<protocol> on the protocol's own data, RUN_DIR/probe-<protocol>-<data
name> on any other: `eval.results.probe_dir_name`). A result made with other settings is not
written over without --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from monossl.cli import positive
from monossl.data.datasets import SPEC_HELP
from monossl.errors import UserError
from monossl.eval.protocols import DEFAULT_PROTOCOL, PROTOCOLS, check_trunk, get_protocol


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", help="a run directory (its trunk.pt) or a trunk checkpoint file")
    parser.add_argument("--random", action="store_true", help="probe a randomly initialised trunk (from --seed)")
    parser.add_argument("--arch", default=None, help="trunk architecture: for --random (default: the protocol's), "
                        "or the architecture RUN_DIR must hold")
    parser.add_argument("--widths", default=None, help="--random cifar trunk: channels of conv1..conv4")
    parser.add_argument("--conv1-kernel", type=positive(), default=None, help="--random cifar trunk: conv1 kernel size")
    parser.add_argument("--data", default="cifar10", help=f"labelled dataset: {SPEC_HELP} (default: cifar10)")
    parser.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                        help="probe protocol (default: cifar for the cifar trunk, asano-max for AlexNets)")
    parser.add_argument("--epochs", type=positive(), default=None,
                        help="override the protocol's epochs (milestones scale)")
    parser.add_argument("--lr", type=positive(float), default=None, help="override the protocol's learning rate")
    parser.add_argument("--batch-size", type=positive(), default=None, help="override the protocol's batch size")
    parser.add_argument("--weight-decay", type=float, default=None, help="override the protocol's weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (and of the --random trunk)")
    parser.add_argument("--subset", type=positive(), default=None, metavar="N",
                        help="probe on a class-balanced subset of N training images")
    parser.add_argument("--test-subset", type=positive(), default=None, metavar="N",
                        help="evaluate on a class-balanced subset of N test images")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading processes for the augmentation path")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download --data (cifar10, cifar100 or stl10) if not found")
    parser.add_argument("--knn", default=None, metavar="K,K",
                        help="also weighted k-NN (cosine, T 0.07) on every tap's cached features, e.g. 20,200 (DINO's)")
    parser.add_argument("--knn-values", type=positive(), default=None, metavar="N",
                        help="k-NN on each tap's features average-pooled further to >= N values (faster; "
                             "default: the linear probes' own features)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/probe-<protocol>, "
                        "or RUN_DIR/probe-<protocol>-<data name> on data other than the protocol's own)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a result in OUT made with other settings (data, protocol, epochs, subset, ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_ks(text: str | None) -> tuple[int, ...]:
    """'20,200' -> (20, 200); None -> ()."""
    if not text:
        return ()
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise UserError(f"--knn wants neighbour counts like 20,200, got {text!r}") from None
    if min(ks) < 1:
        raise UserError(f"--knn counts must be positive, got {text!r}")
    return ks


def run(args: argparse.Namespace) -> int:
    from monossl.data.datasets import load_pair, subset
    from monossl.device import resolve_device
    from monossl.distributed import is_main, setup
    from monossl.eval.probe import probe
    from monossl.eval.results import check_probe_dir, probe_dir_name, probe_settings
    from monossl.models import ARCHS, load_trunk, random_trunk, trunk_config_from
    from monossl.runs import ensure_writable_dir

    ks = parse_ks(args.knn)  # before any data is read
    if args.knn_values and not ks:
        raise UserError("--knn-values needs --knn")
    if args.random and args.run_dir:
        raise UserError("give a RUN_DIR or --random, not both")
    if not args.random and not args.run_dir:
        raise UserError("give a RUN_DIR to probe, or --random --arch ARCH --out DIR")
    if args.arch is not None and args.arch not in ARCHS:
        raise UserError(f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}")
    device = setup(resolve_device(args.device))  # joins torchrun's process group, if any

    if args.random:
        if not args.out:
            raise UserError("--random needs --out DIR (there is no run directory to write into)")
        arch = args.arch or (get_protocol(args.protocol).archs[0] if args.protocol else "cifar")
        protocol = get_protocol(args.protocol or DEFAULT_PROTOCOL[arch])
        trunk = random_trunk(arch, args.seed, **trunk_config_from(args.widths, args.conv1_kernel))
        meta = {"method": "random", "seed": args.seed}
        where = f"--random --arch {arch}"
        out = Path(args.out)
    else:
        trunk, meta = load_trunk(args.run_dir, expect_arch=args.arch)
        meta = {**meta, "source": str(args.run_dir)}
        protocol = get_protocol(args.protocol or DEFAULT_PROTOCOL.get(trunk.arch, "cifar"))
        where = str(args.run_dir)
        rd = Path(args.run_dir)
        run_dir = rd if rd.is_dir() else rd.parent
        out = Path(args.out) if args.out else run_dir / probe_dir_name(protocol.name, args.data)
    check_trunk(trunk, protocol, where)
    protocol = protocol.with_overrides(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                       weight_decay=args.weight_decay)

    train, test = load_pair(args.data, download=args.download)
    if args.subset:
        train = subset(train, args.subset, seed=args.seed)
    if args.test_subset:
        test = subset(test, args.test_subset, seed=args.seed)
    # before any training: a refused rerun leaves the old result as it was
    settings = probe_settings(protocol.to_dict(), args.data, args.seed, len(train), len(test), trunk.arch,
                              dict(getattr(trunk, "config", {})))
    check_probe_dir(out, settings, overwrite=args.overwrite)
    if is_main():
        ensure_writable_dir(out)  # only now: bad input leaves no empty directory behind
    probe(trunk, train, test, protocol, device=device, seed=args.seed, out_dir=out, progress=not args.quiet,
          meta=meta, dataset=args.data, workers=args.workers, knn=ks,
          knn_values=args.knn_values)
    return 0
