"""Pretraining as a library call: `pretrain(PretrainConfig(...)) -> Run`.

Builds a trunk, a method and a data source, and runs the one training loop (train.py) into a
run directory: config.json, metrics.jsonl, last.pt (resumable), and trunk.pt once finished.

Data: `images` (one or more paths or `builtin:NAME`) gives the patch stream of those images;
without images, the images of `data` are used without their labels (the paper's "full data"
baseline); the supervised method uses `data` with its labels.

    from monossl.pretrain import PretrainConfig, pretrain
    run = pretrain(PretrainConfig(method="simclr", out="runs/one", images=["builtin:astronaut"]))
    run.trunk_path  # runs/one/trunk.pt

A run whose loss becomes NaN (or whose BiGAN discriminator wins outright) raises
`monossl.errors.TrainingStopped`; its last checkpoint is good.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from monossl import runs
from monossl.device import resolve_device
from monossl.distributed import is_main, setup, sync_batchnorm, world
from monossl.errors import UserError
from monossl.methods.base import MethodClass, RunDefaults
from monossl.models import Trunk, build_trunk, save_trunk, trunk_config_from
from monossl.tracking import Tracker, import_wandb
from monossl.train import Evaluator, LoopConfig, steps_per_epoch, train

if TYPE_CHECKING:  # the data package is imported when a run builds its source
    from monossl.data.batches import Source

# method name -> (module, class). Each class has a `Config` dataclass of its hyper-parameters.
METHODS = {
    "rotnet": ("monossl.methods.rotnet", "RotNet"),
    "supervised": ("monossl.methods.supervised", "Supervised"),
    "deepcluster": ("monossl.methods.deepcluster", "DeepCluster"),
    "bigan": ("monossl.methods.bigan", "BiGAN"),
    "simclr": ("monossl.methods.simclr", "SimCLR"),
    "distill": ("monossl.methods.distill", "Distill"),  # needs a teacher: `monossl distill`
    "moco": ("monossl.methods.moco", "MoCo"),
    "dino": ("monossl.methods.dino", "DINO"),
}

# Each method's defaults (steps, batch size, patch size, a fixed set, Sobel, AlexNet's lr) are its class's
# `defaults` (methods/base.py RunDefaults), beside its hyper-parameters (its `Config`): `defaults_of`.
# conv1 trained in the whitened space of the training data's own patches (models/whitening.py):
# on the CIFAR trunk it lifts every trained row at conv1 (docs/one_image.md); AlexNet keeps the
# paper's plain parametrisation (not measured there).
WHITEN_CONV1_ARCHS = ("cifar",)
# patches whose ZCA matrix whitens conv1 (the source's first samples)
WHITENING_SAMPLES = 4096
# samples whose BatchNorm statistics a statistics-only control re-estimates (the source's first):
# twice the whitening's, 32 batches of 256; not screened (the controls' probes were not run with others)
BN_SAMPLES = 8192


def defaults_of(method: str) -> RunDefaults:
    """How `method` runs when not told otherwise (its class's `defaults`)."""
    return method_class(method).defaults


def default_lr(method: str, arch: str) -> float | None:
    """The learning rate a method gets on `arch` when none is given (None: its Config's). On AlexNet the
    paper's where it has one: our CIFAR defaults (0.1) made AlexNet RotNet jump to chance after its
    first steps (docs/training.md)."""
    return defaults_of(method).alexnet_lr if arch.startswith("alexnet") else None


#: PretrainConfig fields that set a field of the method's Config, and their command-line options
SHARED_OPTIONS = {"lr": "--lr", "crop_scale": "--crop-scale", "clusters": "--clusters"}


def method_options(config: PretrainConfig, cls: MethodClass, lr: float | None, num_classes: int | None) -> dict:
    """The method's Config fields this run sets: the shared options and `config.method_options`. An
    option the method has no use for is refused in one line, never dropped silently."""
    known = {f.name for f in fields(cls.Config)}
    given = {"lr": lr, "crop_scale": config.crop_scale, "clusters": config.clusters}
    unused = [SHARED_OPTIONS[k] for k, v in given.items() if v is not None and k not in known]
    if unused:
        raise UserError(f"--method {config.method} does not use {', '.join(unused)}")
    unknown = sorted(set(config.method_options) - known)
    if unknown:
        raise UserError(f"--method {config.method} has no option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(sorted(known))}")
    if num_classes is not None and "num_classes" in known:
        given["num_classes"] = num_classes
    return {**{k: v for k, v in given.items() if v is not None}, **config.method_options}


def method_class(name: str) -> MethodClass:
    if name not in METHODS:
        raise UserError(f"unknown --method {name!r}; choose from {', '.join(METHODS)}")
    module, cls = METHODS[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise UserError(f"--method {name} is not available in this version") from None
        raise


@dataclass
class PretrainConfig:
    """Everything one pretraining run takes; None means "the method's or architecture's default"."""

    method: str
    out: str | Path
    arch: str = "cifar"
    conv1_kernel: int | None = None  # CIFAR trunk only
    widths: str | None = None  # CIFAR trunk only: "64,128,256,512"
    sobel: bool | None = None
    images: list[str] | None = None  # None: the images of `data`
    preset: str = "all"
    patch_overrides: dict = field(default_factory=dict)  # PatchConfig fields (data.patch_config.parse_overrides)
    patch_size: int | None = None
    patch_device: str | None = None
    num_patches: int | None = None  # a finite training set: the stream's first N patches
    data: str | None = None
    steps: int | None = None
    epochs: int | None = None  # instead of steps, over a finite set
    batch_size: int | None = None
    lr: float | None = None
    crop_scale: tuple[float, float] | None = None
    clusters: int | None = None
    whiten_conv1: bool | None = None
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False
    resume: bool = False
    stop_after: int | None = None  # stop (checkpointed) after this many steps: tests and debugging
    method_options: dict = field(default_factory=dict)  # more fields of the method's Config (distill: teacher, ...)
    progress: bool | None = None  # None: a bar on a terminal
    wandb: str | None = None  # a Weights & Biases project that gets the run's numbers too (tracking.py)


@dataclass
class Run:
    """What `pretrain` leaves: the run directory, its resolved configuration and where it got to."""

    out: Path
    config: dict
    steps_done: int
    finished: bool
    trunk_path: Path | None  # None until the run has finished
    metrics: dict = field(default_factory=dict)  # the last logged record


def build_source(config: PretrainConfig, trunk: Trunk, device: torch.device | None = None) -> tuple[Source, dict]:
    """The training data: the patch stream of `config.images`, or `config.data`'s images (with labels
    when the method needs them). Returns (source, info for config.json).

    A folder's images are read from disk at S x S (short side resized to S, centre crop), S being
    the patch size, so the methods see the same kind of input either way."""
    from monossl.data.batches import StreamSource, dataset_source

    needs = method_class(config.method).needs
    small = trunk.input_size <= 64
    size = config.patch_size or (defaults_of(config.method).patch_size if small else 256)
    if needs == "labelled" or not config.images:
        if not config.data:
            what = "labelled --data" if needs == "labelled" else "--image or --data"
            raise UserError(f"--method {config.method} needs {what}")
        from monossl.data.datasets import load_pair

        train_set, _ = load_pair(config.data)
        source = dataset_source(train_set, needs == "labelled", size, seed=config.seed)
        return source, {"data": config.data, "num_classes": len(train_set.classes)}

    from monossl.data.patch_config import make_config
    from monossl.data.procedural_stream import open_stream

    patch_config = make_config(config.preset, size=size, **config.patch_overrides)
    # patches are made where the training runs (on the GPU when there is one), unless asked otherwise
    stream_device = resolve_device(config.patch_device) if config.patch_device else (device or "cpu")
    # the patch stream of the images, or a per-sample procedural source (procedural:fractal, ...)
    stream = open_stream(config.images, patch_config, seed=config.seed, device=stream_device, names=config.images)
    length = config.num_patches or defaults_of(config.method).num_patches
    info = {"image": config.images, "preset": config.preset, "patch_config": asdict(patch_config)}
    return StreamSource(stream, length=length, seed=config.seed), info


def initial_trunk(config: PretrainConfig, device: torch.device | None = None) -> tuple[Trunk, Source, dict, bool]:
    """What a run starts from, before its first step: the seeded trunk (the same weights as
    `models.random_trunk(arch, seed)`), its training source, and conv1 in the whitened coordinates of
    the source's first samples where asked (the default on the CIFAR trunk).
    Returns (trunk, source, data info for config.json, whether conv1 is whitened)."""
    torch.manual_seed(config.seed)
    if (config.conv1_kernel is not None or config.widths is not None) and config.arch != "cifar":
        raise UserError("--conv1-kernel and --widths apply to --arch cifar only")
    trunk_config = trunk_config_from(config.widths, config.conv1_kernel)
    if defaults_of(config.method).sobel if config.sobel is None else config.sobel:
        trunk_config["sobel"] = True
    trunk = build_trunk(config.arch, **trunk_config)
    source, data_info = build_source(config, trunk, device)
    whiten_conv1 = trunk.arch in WHITEN_CONV1_ARCHS if config.whiten_conv1 is None else config.whiten_conv1
    if whiten_conv1:
        from monossl.models import whitening

        # the source's first samples (a shuffle of a dataset): what this run trains on, no labels used
        zca = whitening.conv1_patch_whitening(trunk, first_samples(source, WHITENING_SAMPLES), seed=config.seed)
        whitening.whiten(trunk, zca)
    return trunk, source, data_info, whiten_conv1


def first_samples(source: Source, n: int) -> torch.Tensor:
    """The images of a source's first n samples (the stream's patches 0..n-1, a dataset's first n in its
    epoch-0 shuffle), in [0, 1]: what the run trains on first; no labels."""
    first = torch.arange(n) if source.length is None else source.order(0)[:n]
    return source.fetch(first)["images"]


@torch.no_grad()
def statistics_trunk(config: PretrainConfig, bn_samples: int = BN_SAMPLES, batch_size: int = 256):
    """Step 0 of `config`'s run made a trunk: the statistics of its training data and nothing learned.

    The initial trunk of the run (`initial_trunk`: the same random weights, conv1 whitened by the
    source's patches when the run would be), folded to a plain conv1, with every BatchNorm's running
    statistics re-estimated on the source's first `bn_samples` samples (resized to the trunk's input;
    torch's `update_bn`: the average of whole batches' statistics, no momentum). No gradient step is
    taken: the control rows of `monossl compare` ("image statistics only", "dataset statistics only").
    Returns (trunk in eval mode, meta for its probe results)."""
    import torch.nn.functional as F
    from torch.optim.swa_utils import update_bn

    from monossl.models import whitening

    trunk, source, data_info, whiten_conv1 = initial_trunk(config)
    whitening.fold(trunk)
    images = first_samples(source, bn_samples)
    if len(images) >= batch_size:  # whole batches only: update_bn averages the batches' statistics equally
        images = images[:len(images) // batch_size * batch_size]
    size = trunk.input_size
    batches = [F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
               if x.shape[-1] != size else x for x in images.split(batch_size)]
    update_bn(batches, trunk)
    meta = {"method": "statistics", "statistics_of": config.method, "seed": config.seed, "total_steps": 0,
            "whiten_conv1": whiten_conv1, "bn_samples": len(images)}
    meta.update({k: data_info[k] for k in ("image", "preset", "data") if k in data_info})
    return trunk.eval(), meta


def pretrain(config: PretrainConfig, evaluators: Sequence[Evaluator] = ()) -> Run:
    """Train (or, with `config.resume`, continue) one run; see the module docstring.

    evaluators: called during training and logged in metrics.jsonl (train.train; e.g.
    eval.curves.CurveProbe); each one's `describe()` is recorded in config.json under "evaluations"."""
    cls = method_class(config.method)
    if config.wandb:
        import_wandb()  # not installed: refused in one line before anything runs
    device = setup(resolve_device(config.device))  # joins torchrun's process group, if any
    out = Path(config.out)
    if out.is_dir() and is_main():
        runs.lock_run_dir(out)  # a run directory in use is refused at once, naming the process that has it
    if (out / "last.pt").exists() and not config.resume:
        raise UserError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if config.resume and not (out / "config.json").exists():
        raise UserError(f"--resume: {out} holds no run to resume (no config.json)")

    trunk, source, data_info, whiten_conv1 = initial_trunk(config, device)
    batch_size = config.batch_size or cls.defaults.batch_size
    spe = steps_per_epoch(source, batch_size)  # refuses a finite set smaller than one batch
    if config.epochs is not None:
        if spe is None:
            raise UserError("--epochs needs a finite training set: give --num-patches or --data")
        total_steps = config.epochs * spe
    else:
        total_steps = config.steps if config.steps is not None else cls.defaults.steps

    lr = config.lr if config.lr is not None else default_lr(config.method, trunk.arch)
    options = method_options(config, cls, lr, data_info.get("num_classes"))
    try:
        method_config = cls.Config(**options)
    except TypeError as exc:  # e.g. a --method-option whose value the field cannot take
        raise UserError(f"--method {config.method}: {exc}") from None
    method = cls(trunk, total_steps, method_config)
    if config.sync_bn and world()[1] > 1:
        sync_batchnorm(method, device)  # the trunk's and the heads' (SimCLR's projector) BatchNorm

    record = {
        "method": config.method, "arch": trunk.arch, "arch_config": trunk.config,
        "method_config": asdict(method.config), "seed": config.seed, "batch_size": batch_size,
        "total_steps": total_steps, "device": str(device), "world_size": world()[1], "sync_bn": bool(config.sync_bn),
        "whiten_conv1": whiten_conv1, "source": source.describe(), **data_info,
    }
    if evaluators:
        record["evaluations"] = {e.event: {"every": e.every, **e.describe()} for e in evaluators}
    # only now, with every option checked: bad input leaves no empty run directory behind
    if is_main():
        runs.lock_run_dir(out)  # torchrun's other processes share rank 0's run directory
    else:
        runs.ensure_writable_dir(out)
    if config.resume:
        # the device and the number of processes may change (a step is the same global batch in any
        # world size); keys an older version did not write are not compared
        runs.check_settings(out / "config.json", record, "--resume: the options differ from the run in "
                            f"{out} ({{changed}})", ignore=("device", "world_size", "evaluations"),
                            what="run configuration")
    elif is_main():
        runs.write_json(out / "config.json", {**record, "environment": runs.environment()})

    loop = LoopConfig(total_steps=total_steps, batch_size=batch_size, seed=config.seed,
                      checkpoint_every=max(1, min(100, total_steps // 10)), stop_after=config.stop_after)
    tracker = Tracker(out, wandb_project=config.wandb, run_config=record)
    result = train(method, source, loop, out, device, progress=config.progress, evaluators=evaluators,
                   tracker=tracker)
    trunk_path = None
    if result["finished"]:
        trunk_path = out / "trunk.pt"
        if is_main():
            from monossl.models import whitening

            trunk = method.published_trunk()
            whitening.fold(trunk)  # a plain trunk: conv1.weight = U Z
            meta = {k: record[k] for k in ("method", "seed", "total_steps")}
            meta.update({k: data_info[k] for k in ("image", "preset", "data") if k in data_info})
            save_trunk(trunk_path, trunk, meta)
            head = method.classifier_head()
            if head is not None:  # a classifier (e.g. a teacher to distil): its head beside the trunk
                from monossl.models.classifier import save_classifier

                save_classifier(out / "classifier.pt", head, meta)
    return Run(out=out, config=record, steps_done=result["step"], finished=result["finished"],
               trunk_path=trunk_path, metrics=result["metrics"])
