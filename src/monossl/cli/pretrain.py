"""`monossl pretrain`: train a trunk with a self-supervised or supervised method (monossl.pretrain)."""

from __future__ import annotations

import argparse

from monossl.cli import positive
from monossl.data.datasets import SPEC_HELP
from monossl.errors import UserError
from monossl.models import ARCHS
from monossl.pretrain import METHODS, PretrainConfig, pretrain


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="run directory (created; rerun with --resume to continue)")
    p.add_argument("--arch", default="cifar", help=f"trunk: {', '.join(ARCHS)} (default cifar)")
    p.add_argument("--conv1-kernel", type=positive(), default=None, help="CIFAR trunk: conv1 kernel size")
    p.add_argument("--widths", default=None, help="CIFAR trunk: channels of conv1..conv4, e.g. 64,128,256,512")
    p.add_argument("--sobel", action=argparse.BooleanOptionalAction, default=None,
                   help="fixed Sobel front-end (greyscale + gradients); default on for deepcluster, off otherwise")
    p.add_argument("--image", action="append", default=None,
                   help="source image (path, builtin:NAME or procedural:KIND, docs/procedural.md); repeat for several; "
                        "omit to use --data's images")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--patch", action="append", default=[], metavar="KEY=VALUE",
                   help="override a patch-stream parameter, e.g. --patch rotation_degrees=10")
    p.add_argument("--patch-size", type=positive(), default=None,
                   help="patch side S (default 32 for cifar, 256 for AlexNet)")
    p.add_argument("--patch-device", default=None, help="where to make patches: cpu or cuda (default: --device)")
    p.add_argument("--num-patches", type=positive(), default=None,
                   help="use the stream's first N patches as a fixed training set (epochs); default: unlimited "
                        "(DeepCluster: 32768)")
    p.add_argument("--data", default=None, help=f"labelled dataset: {SPEC_HELP}")
    p.add_argument("--steps", type=positive(), default=None, help="training steps (default depends on the method)")
    p.add_argument("--epochs", type=positive(), default=None,
                   help="training epochs over a finite set (instead of --steps)")
    p.add_argument("--batch-size", type=positive(), default=None, help="images per step (RotNet: x4 samples)")
    p.add_argument("--lr", type=positive(float), default=None, help="base learning rate (default: the method's)")
    p.add_argument("--crop-scale", default=None, metavar="MIN,MAX",
                   help="area range of the method's own random-resized crop (default: the method's)")
    p.add_argument("--clusters", type=positive(), default=None, help="DeepCluster: k (default scaled to the set size)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="set a field of the method's configuration, e.g. --method-option clip_grad=0 for dino "
                        "(docs/training.md lists them)")
    p.add_argument("--whiten-conv1", action=argparse.BooleanOptionalAction, default=None,
                   help="train conv1 in the whitened space of the training data's own patches (W = U Z, Z the ZCA "
                        "matrix of its first patches/images; folded into a plain trunk at the end; default on for "
                        "--arch cifar, off for AlexNet: docs/one_image.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm over the global batch instead of each process's part")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--probe-every", type=positive(), default=None, metavar="N",
                   help="every N steps (and at steps 0 and the last), probe every tap on a validation split of "
                        "--probe-data's training images; logged in metrics.jsonl, drawn in learning_curves.png")
    p.add_argument("--probe-data", default="cifar10",
                   help="labelled dataset of the --probe-every curves (default cifar10)")
    p.add_argument("--probe-split", default="5000,1000", metavar="TRAIN,VAL",
                   help="sizes of the curves' class-balanced train/validation parts (default 5000,1000)")
    p.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log the run's numbers to this Weights & Biases project (needs the wandb package)")
    p.add_argument("--stop-after", type=positive(), default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_range(option: str, text: str | None) -> tuple[float, float] | None:
    """'0.2,1' -> (0.2, 1.0), with 0 < MIN <= MAX <= 1."""
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} wants MIN,MAX, got {text!r}") from None
    if not 0 < low <= high <= 1:
        raise UserError(f"{option} wants 0 < MIN <= MAX <= 1, got {text!r}")
    return low, high


def parse_sizes(option: str, text: str) -> tuple[int, int]:
    """'5000,1000' -> (5000, 1000), both positive."""
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} wants two sizes like 5000,1000, got {text!r}") from None
    if a <= 0 or b <= 0:
        raise UserError(f"{option} sizes must be positive, got {text!r}")
    return a, b


def config_from(args: argparse.Namespace) -> PretrainConfig:
    from monossl.data.patch_config import parse_overrides
    from monossl.pretrain import method_class

    patch_overrides = parse_overrides(args.patch, "--patch")
    if "size" in patch_overrides:
        raise UserError("give the patch size with --patch-size, not --patch size=...")
    method_options = parse_overrides(args.method_option, "--method-option", method_class(args.method).Config,
                                     what=f"option of --method {args.method}")
    return PretrainConfig(
        method=args.method, out=args.out, arch=args.arch, conv1_kernel=args.conv1_kernel, widths=args.widths,
        sobel=args.sobel, images=args.image, preset=args.preset, patch_overrides=patch_overrides,
        patch_size=args.patch_size, patch_device=args.patch_device, num_patches=args.num_patches, data=args.data,
        steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        crop_scale=parse_range("--crop-scale", args.crop_scale), clusters=args.clusters,
        whiten_conv1=args.whiten_conv1, seed=args.seed, device=args.device, sync_bn=args.sync_bn,
        resume=args.resume, stop_after=args.stop_after, method_options=method_options,
        progress=False if args.quiet else None, wandb=args.wandb)


def run(args: argparse.Namespace) -> int:
    from monossl.distributed import is_main

    config = config_from(args)
    curves = None
    if args.probe_every is not None:
        from monossl.device import resolve_device
        from monossl.distributed import setup
        from monossl.eval.curves import CurveProbe

        n_train, n_val = parse_sizes("--probe-split", args.probe_split)
        curves = CurveProbe(args.probe_data, args.arch, args.probe_every, n_train, n_val, seed=args.seed,
                            device=setup(resolve_device(args.device)))
    result = pretrain(config, evaluators=[curves] if curves else [])
    if not is_main():
        return 0
    if curves is not None:
        from monossl import runs
        from monossl.viz.plots import write_learning_curves

        records = runs.curve_records(runs.read_jsonl(result.out / "metrics.jsonl"))
        title = f"{args.method}, {', '.join(args.image) if args.image else args.data}: {curves.data} validation"
        write_learning_curves(records, result.out / "learning_curves.png", title=title)
    total = result.config["total_steps"]
    if result.finished:
        print(f"pretrained {args.method} for {total} steps -> {result.trunk_path}")
    else:
        print(f"stopped after {result.steps_done} of {total} steps; rerun with --resume to continue")
    return 0
