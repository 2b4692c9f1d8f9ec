"""`monossl stylize`: Gatys style transfer with one network, or several side by side (monossl.viz.style)."""

from __future__ import annotations

import argparse

import torch

from monossl.cli import positive
from monossl.device import resolve_device
from monossl.errors import UserError
from monossl.viz.figures import figure_format, save_figure
from monossl.viz.networks import networks
from monossl.viz.style import compare_figure, image_format, stylize, write_image


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--content", default="builtin:astronaut", help="content image (path or builtin:NAME; "
                        "default builtin:astronaut)")
    parser.add_argument("--style", default="builtin:coffee", help="style image (default builtin:coffee)")
    parser.add_argument("--run", default=None, help="the network: a run directory or trunk.pt (or random[:SEED])")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RUN",
                        help="several networks (run directories, random[:SEED]): one labelled figure")
    parser.add_argument("--random", action="store_true", help="use (or add) a randomly initialised trunk")
    parser.add_argument("--arch", default="cifar", help="architecture of random trunks (default cifar)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random trunk and of --init noise")
    parser.add_argument("--out", default="stylized.png", help="output: the image (one network) or the figure "
                        "(--compare); default stylized.png")
    parser.add_argument("--size", type=positive(), default=256, help="longer side in pixels (default 256)")
    parser.add_argument("--steps", type=positive(), default=100, help="L-BFGS iterations (default 100)")
    parser.add_argument("--max-seconds", type=positive(float), default=None,
                        help="per network, stop after the round of 20 iterations that passes this time")
    parser.add_argument("--style-weight", type=float, default=100.0, help="style weight (default 100)")
    parser.add_argument("--content-weight", type=float, default=1.0, help="content weight (default 1)")
    parser.add_argument("--style-taps", default=None, help="comma-separated taps for style (default conv1..conv4)")
    parser.add_argument("--content-tap", default=None, help="tap for content (default conv3)")
    parser.add_argument("--pool", default="avg", choices=("avg", "max"), help="pooling inside the trunk (default avg)")
    parser.add_argument("--init", default="content", choices=("content", "noise"), help="start image (default content)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--threads", type=positive(), default=None,
                        help="CPU threads for torch (default: torch's; 1 is faster on a busy machine)")
    parser.add_argument("--title", default=None, help="figure title (--compare)")


def run(args: argparse.Namespace) -> int:
    specs = ([args.run] if args.run else []) + list(args.compare or [])
    if args.compare is None and (bool(args.run) + bool(args.random)) != 1:
        raise UserError("give one network (--run RUN or --random), or several with --compare RUN [RUN ...]")
    if args.compare is not None:  # refuse a bad --out before any work
        figure_format(args.out)
    else:
        image_format(args.out)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    nets = networks(specs, random=args.random, arch=args.arch, seed=args.seed)
    style_taps = [t.strip() for t in args.style_taps.split(",") if t.strip()] if args.style_taps else None
    results = []
    for net in nets:
        print(f"[{net.label}]")
        r = stylize(net.trunk, args.content, args.style, size=args.size, steps=args.steps,
                    style_weight=args.style_weight, content_weight=args.content_weight, style_taps=style_taps,
                    content_tap=args.content_tap, pool=args.pool, init=args.init, seed=args.seed, device=device,
                    max_seconds=args.max_seconds)
        results.append((net.label, r))
    if args.compare is None:
        write_image(results[0][1]["image"], args.out)
    else:
        content, style = results[-1][1]["content"], results[-1][1]["style"]
        save_figure(compare_figure(content, style, results, args.title), args.out)
    print(f"wrote {args.out}")
    return 0
