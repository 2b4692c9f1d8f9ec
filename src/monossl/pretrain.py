"""`monossl pretrain`: build a trunk, a method and a data source, and run the training loop.

Data: `--image` (one or more, or `builtin:NAME`) gives the patch stream of those images;
without `--image`, the images of `--data` are used without their labels (the paper's
"full data" baseline); the supervised method uses `--data` with its labels.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from monossl import runs
from monossl.device import resolve_device
from monossl.distributed import is_main, setup, sync_batchnorm, world
from monossl.errors import UserError
from monossl.models import ARCHS, build_trunk, save_trunk, trunk_config_from
from monossl.train import LoopConfig, steps_per_epoch, train

# method name -> (module, class). Each class has a `Config` dataclass of its hyper-parameters.
METHODS = {
    "rotnet": ("monossl.methods.rotnet", "RotNet"),
    "supervised": ("monossl.methods.supervised", "Supervised"),
    "deepcluster": ("monossl.methods.deepcluster", "DeepCluster"),
    "bigan": ("monossl.methods.bigan", "BiGAN"),
    "simclr": ("monossl.methods.simclr", "SimCLR"),
}

# Default budgets (steps at the default batch size) per method on the CIFAR trunk, sized so
# that the main job fits in about 15 minutes on 2 CPU cores; see README for what they reach.
# DeepCluster: 16 epochs over 32,768 patches (docs/deepcluster.md has the runs behind it).
DEFAULT_STEPS = {"rotnet": 800, "supervised": 500, "deepcluster": 4096, "bigan": 1500, "simclr": 1000}
DEFAULT_BATCH = {"rotnet": 64, "supervised": 128, "deepcluster": 128, "bigan": 64, "simclr": 128}
# DeepCluster clusters colour first unless its input is greyscale gradients (Caron et al.
# use the Sobel front-end too); on one image it is what lets it beat random features.
DEFAULT_SOBEL = {"deepcluster": True}
# SimCLR cuts its two views (random-resized crops to 32 px) out of 48-px patches of the stream.
DEFAULT_PATCH_SIZE = {"simclr": 48}
# conv1 trained in the whitened space of the training data's own patches (models/whitening.py):
# on the CIFAR trunk it lifts every trained row at conv1 (docs/one_image.md); AlexNet keeps the
# paper's plain parametrisation (not measured there).
WHITEN_CONV1_ARCHS = ("cifar",)
# On AlexNet the paper's learning rates (PAPER.md section 2; supervised: the usual 0.01): our CIFAR
# defaults (0.1) made AlexNet RotNet jump to chance after its first steps (docs/training.md).
ALEXNET_LR = {"rotnet": 0.01, "supervised": 0.01, "deepcluster": 0.05}


def default_lr(method: str, arch: str) -> float | None:
    """The learning rate a method gets on `arch` when none is given (None: the method's own)."""
    return ALEXNET_LR.get(method) if arch.startswith("alexnet") else None


def method_class(name: str):
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; choose from {', '.join(METHODS)}")
    module, cls = METHODS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise UserError(f"--method {name} is not available in this version") from None
        raise


def configure(p: argparse.ArgumentParser) -> None:
    from monossl.cli import positive

    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    p.add_argument("--out", required=True, help="run directory (created; rerun with --resume to continue)")
    p.add_argument("--arch", default="cifar", help=f"trunk: {', '.join(ARCHS)} (default cifar)")
    p.add_argument("--conv1-kernel", type=positive(), default=None, help="CIFAR trunk: conv1 kernel size")
    p.add_argument("--widths", default=None, help="CIFAR trunk: channels of conv1..conv4, e.g. 64,128,256,512")
    p.add_argument("--sobel", action=argparse.BooleanOptionalAction, default=None,
                   help="fixed Sobel front-end (greyscale + gradients); default on for deepcluster, off otherwise")
    p.add_argument("--image", action="append", default=None,
                   help="source image (path or builtin:NAME); repeat for several; omit to use --data's images")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--patch", action="append", default=[], metavar="KEY=VALUE",
                   help="override a patch-stream parameter, e.g. --patch rotation_degrees=10")
    p.add_argument("--patch-size", type=positive(), default=None, help="patch side S (default 32 for cifar, 256 for AlexNet)")
    p.add_argument("--patch-device", default=None, help="where to make patches: cpu or cuda (default: --device)")
    p.add_argument("--num-patches", type=positive(), default=None,
                   help="use the stream's first N patches as a fixed training set (epochs); default: unlimited "
                        "(DeepCluster: 32768)")
    p.add_argument("--data", default=None, help="dataset: cifar10, cifar10:PATH or folder:PATH")
    p.add_argument("--steps", type=positive(), default=None, help="training steps (default depends on the method)")
    p.add_argument("--epochs", type=positive(), default=None, help="training epochs over a finite set (instead of --steps)")
    p.add_argument("--batch-size", type=positive(), default=None, help="images per step (RotNet: x4 samples)")
    p.add_argument("--lr", type=positive(float), default=None, help="base learning rate (default: the method's)")
    p.add_argument("--crop-scale", default=None, metavar="MIN,MAX",
                   help="area range of the method's own random-resized crop (default: the method's)")
    p.add_argument("--clusters", type=positive(), default=None, help="DeepCluster: k (default scaled to the set size)")
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
    p.add_argument("--probe-data", default="cifar10", help="labelled dataset of the --probe-every curves (default cifar10)")
    p.add_argument("--probe-split", default="5000,1000", metavar="TRAIN,VAL",
                   help="sizes of the curves' class-balanced train/validation parts (default 5000,1000)")
    p.add_argument("--stop-after", type=positive(), default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--patch wants KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_range(option: str, text: str | None) -> tuple[float, float] | None:
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


def build_source(args, trunk, seed: int, method_needs: str, device=None):
    """The training data: patch stream of --image, or --data's images (with labels when needed).

    A folder's images are read from disk at S x S (short side resized to S, centre crop), S being
    --patch-size as for patches, so the methods see the same kind of input either way."""
    from monossl.data.batches import StreamSource, dataset_source

    small = trunk.input_size <= 64
    size = args.patch_size or (DEFAULT_PATCH_SIZE.get(args.method, 32) if small else 256)
    if method_needs == "labelled" or not args.image:
        if not args.data:
            what = "labelled --data" if method_needs == "labelled" else "--image or --data"
            raise UserError(f"--method {args.method} needs {what}")
        from monossl.data.datasets import load_pair

        train_set, _ = load_pair(args.data)
        source = dataset_source(train_set, method_needs == "labelled", size, seed=seed)
        return source, {"data": args.data, "num_classes": len(train_set.classes)}

    from monossl.data.patches import PatchStream, make_config
    from monossl.data.sources import load_images

    patch_config = make_config(args.preset, size=size, **parse_overrides(args.patch))
    # patches are made where the training runs (on the GPU when there is one), unless asked otherwise
    stream_device = resolve_device(args.patch_device) if args.patch_device else (device or "cpu")
    stream = PatchStream(load_images(args.image), patch_config, seed=seed, device=stream_device, names=args.image)
    length = args.num_patches
    if length is None and args.method == "deepcluster":
        length = 32768  # DeepCluster needs a fixed set: its pseudo-labels are per index
    info = {"image": args.image, "preset": args.preset, "patch_config": asdict(patch_config)}
    return StreamSource(stream, length=length, seed=seed), info


def run(args) -> int:
    cls = method_class(args.method)
    device = setup(resolve_device(args.device))  # joins torchrun's process group, if any
    out = Path(args.out)
    if out.is_dir() and is_main():
        runs.lock_run_dir(out)  # a run directory in use is refused at once, naming the process that has it
    if (out / "last.pt").exists() and not args.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / "config.json").exists():
        raise UserError(f"--resume: {out} holds no run to resume (no config.json)")

    torch.manual_seed(args.seed)
    if (args.conv1_kernel is not None or args.widths is not None) and args.arch != "cifar":
        raise UserError("--conv1-kernel and --widths apply to --arch cifar only")
    trunk_config = trunk_config_from(args.widths, args.conv1_kernel)
    if DEFAULT_SOBEL.get(args.method, False) if args.sobel is None else args.sobel:
        trunk_config["sobel"] = True
    trunk = build_trunk(args.arch, **trunk_config)
    if args.sync_bn and world()[1] > 1:
        sync_batchnorm(trunk, device)
    source, data_info = build_source(args, trunk, args.seed, cls.needs, device)
    curves = None
    if args.probe_every is not None:
        from monossl.eval.curves import CurveProbe

        n_train, n_val = parse_sizes("--probe-split", args.probe_split)
        curves = CurveProbe(args.probe_data, trunk.arch, n_train, n_val, seed=args.seed, device=device)
    batch_size = args.batch_size or DEFAULT_BATCH.get(args.method, 64)
    spe = steps_per_epoch(source, batch_size)  # refuses a finite set smaller than one batch
    if args.epochs is not None:
        if spe is None:
            raise UserError("--epochs needs a finite training set: give --num-patches or --data")
        total_steps = args.epochs * spe
    else:
        total_steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.method, 500)

    whiten_conv1 = trunk.arch in WHITEN_CONV1_ARCHS if args.whiten_conv1 is None else args.whiten_conv1
    if whiten_conv1:
        from monossl.models import whitening

        # the source's first samples (a shuffle of a dataset): what this run trains on, no labels used
        first = torch.arange(4096) if source.length is None else source.order(0)[:4096]
        whitening.whiten(trunk, whitening.conv1_patch_whitening(trunk, source.fetch(first)["images"], seed=args.seed))

    known = {f.name for f in fields(cls.Config)}
    lr = args.lr if args.lr is not None else default_lr(args.method, trunk.arch)
    method_kwargs = {"lr": lr, "num_classes": data_info.get("num_classes"), "clusters": args.clusters,
                     "crop_scale": parse_range("--crop-scale", args.crop_scale)}
    method_config = cls.Config(**{k: v for k, v in method_kwargs.items() if v is not None and k in known})
    method = cls(trunk, total_steps, method_config)

    config = {
        "method": args.method, "arch": trunk.arch, "arch_config": trunk.config, "method_config": asdict(method.config),
        "seed": args.seed, "batch_size": batch_size, "total_steps": total_steps, "device": str(device),
        "world_size": world()[1], "sync_bn": bool(args.sync_bn), "whiten_conv1": whiten_conv1,
        "source": source.describe(), **data_info,
    }
    if curves is not None:
        config["curves"] = {"every": args.probe_every, **curves.describe()}
    # only now, with every option checked: bad input leaves no empty run directory behind
    if is_main():
        runs.lock_run_dir(out)  # torchrun's other processes share rank 0's run directory
    else:
        runs.ensure_writable_dir(out)
    if args.resume:
        previous = runs.read_json(out / "config.json", "run configuration")
        as_json = functools.partial(json.dumps, default=str)  # compares tuples and lists alike
        # the device and the number of processes may change (a step is the same global batch in any
        # world size); keys an older version did not write are not compared
        changed = [k for k in config if k not in ("device", "world_size", "curves") and k in previous
                   and as_json(previous[k]) != as_json(config[k])]
        if changed:
            raise UserError(f"--resume: the options differ from the run in {out} ({', '.join(changed)})")
    elif is_main():
        runs.write_json(out / "config.json", {**config, "environment": runs.environment()})

    loop = LoopConfig(total_steps=total_steps, batch_size=batch_size, seed=args.seed,
                      checkpoint_every=max(1, min(100, total_steps // 10)), stop_after=args.stop_after,
                      evaluate_every=args.probe_every)
    result = train(method, source, loop, out, device, progress=False if args.quiet else None, evaluate=curves)
    if curves is not None and is_main():
        from monossl.viz.plots import write_learning_curves

        records = runs.curve_records(runs.read_jsonl(out / "metrics.jsonl"))
        title = f"{args.method}, {', '.join(args.image) if args.image else args.data}: {curves.data} validation"
        write_learning_curves(records, out / "learning_curves.png", title=title)
    if result["finished"] and is_main():
        from monossl.models import whitening

        whitening.fold(method.trunk)  # a plain trunk: conv1.weight = U Z
        meta = {k: config[k] for k in ("method", "seed", "total_steps") if k in config}
        meta.update({k: data_info[k] for k in ("image", "preset", "data") if k in data_info})
        save_trunk(out / "trunk.pt", method.trunk, meta)
        print(f"pretrained {args.method} for {total_steps} steps -> {out / 'trunk.pt'}")
    elif is_main():
        print(f"stopped after {result['step']} of {total_steps} steps; rerun with --resume to continue")
    return 0
