"""`monossl generate`: write patches of one image (or a few) to disk (`data.generate.write_patches`).

    monossl generate --image builtin:astronaut --preset all --size 32 --count 1000 \\
        --out out/p --preview out/p.png

Overrides: `--set KEY=VALUE` (repeatable) sets any PatchConfig field, e.g.
`--set rotation_degrees=10 --set area_range=0.01,1 --set scale=false` (the syntax of
`pretrain --patch`: `data.patch_config.parse_overrides`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monossl.cli import positive
from monossl.data import generate, sources
from monossl.data.patch_config import FILL_MODES, PRESETS, make_config, parse_overrides
from monossl.errors import UserError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", metavar="SPEC",
                        help="source image: a file, builtin:NAME (see `monossl images`) or procedural:KIND "
                             "(docs/procedural.md); repeat it "
                             "or give a comma list for several images (each patch picks one). "
                             "Default: builtin:astronaut")
    parser.add_argument("--preset", default="all",
                        help=f"augmentation preset: {', '.join(PRESETS)} (default: all, the paper's)")
    parser.add_argument("--size", type=positive(), default=32, help="patch side S in pixels (default 32)")
    parser.add_argument("--count", type=int, default=1000, help="number of patches (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="patch i depends only on (seed, i)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--format", default="png", choices=generate.FORMATS,
                        help="png/jpg files in DIR/train/dummy, or one npy array (default png)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    parser.add_argument("--fill", choices=FILL_MODES, default=None,
                        help="black: the released generator's black wedges (default); "
                             "none: never a fill pixel")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any patch parameter, e.g. rotation_degrees=10, "
                             "area_range=0.01,1, scale=false, jitter_prob=0.8 (repeatable)")
    parser.add_argument("--preview", metavar="PNG", help="also write a contact sheet of the first patches")
    parser.add_argument("--batch-size", type=positive(), default=256, help="patches rendered per batch")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default: bit-reproducible files), cuda or auto")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering and encoding files on CPU (default: one per core; "
                             "1: all in this process)")


def run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set, "--set")
    if "size" in overrides:
        raise UserError("give the patch size with --size, not --set size=...")
    if args.fill is not None:
        overrides["fill"] = args.fill
    config = make_config(args.preset, size=args.size, **overrides)
    images = sources.split_specs(args.image) or [sources.BUILTIN_PREFIX + sources.DEFAULT_IMAGE]

    bar = None

    def progress(n: int) -> None:  # the bar appears once writing starts, never before an error
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=args.count, unit="patch", desc="generate", disable=not sys.stderr.isatty())
        bar.update(n)

    try:
        meta = generate.write_patches(
            images, config, args.out, args.count, seed=args.seed, fmt=args.format, quality=args.quality,
            batch_size=args.batch_size, device=args.device, workers=args.workers, preview=args.preview,
            progress=progress, preset=args.preset)
    finally:
        if bar is not None:
            bar.close()
    out = Path(args.out)
    where = out / "patches.npy" if args.format == "npy" else out / generate.FILE_DIR
    print(f"wrote {args.count} patches of {args.size}x{args.size} ({args.format}) to {where}"
          + (f", preview {Path(args.preview)}" if args.preview else "") + f" in {meta['seconds']:.1f} s")
    return 0
