"""Fine-tune a pretrained trunk with some layers frozen, then probe it: `finetune(FinetuneConfig(...))`.

PAPER.md §4 (Table 4): keep the named layers of a pretrained trunk exactly (weights and
BatchNorm running statistics), re-initialise everything else, train the trunk and a new linear
classifier with the labels of `data` (`methods.finetune.FineTune`, the one training loop with
its checkpoints and resume), then probe every tap with linear classifiers:

  * OUT/config.json (the settings; a resumed run must match them), OUT/last.pt, OUT/trunk.pt;
  * OUT/probe-<protocol>/results.{json,md} as `monossl probe` writes them (the same folder name:
    `results.probe_dir_name`).

OUT defaults to RUN/finetune-<layers> (e.g. runs/rot/finetune-conv1-conv2). Every setting is
checked before anything is written. A training run that cannot go on raises
`monossl.errors.TrainingStopped` (its last checkpoint is good).

    result = finetune(FinetuneConfig(run_dir="runs/rot", data="cifar10", steps=500))
    result["taps"]["conv3"]["top1"]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from monossl import runs
from monossl.data.batches import dataset_source
from monossl.data.datasets import load_pair, subset
from monossl.device import resolve_device
from monossl.distributed import is_main, setup, sync_batchnorm, world
from monossl.errors import UserError
from monossl.eval.probe import probe
from monossl.eval.protocols import DEFAULT_PROTOCOL, check_trunk, get_protocol
from monossl.eval.results import ProbeResult, probe_dir_name, write_results
from monossl.methods.finetune import FineTune, reinitialised_trunk
from monossl.methods.supervised import SupervisedConfig
from monossl.models import load_trunk, save_trunk
from monossl.pretrain import default_lr, defaults_of
from monossl.train import LoopConfig, steps_per_epoch, train

log = logging.getLogger(__name__)

DEFAULT_FREEZE = ("conv1", "conv2")


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run takes; None means "the default" (noted per field)."""

    run_dir: str | Path  # the pretrained run: a directory holding trunk.pt, or the trunk file
    data: str  # labelled dataset to fine-tune and probe on (a `monossl.data.datasets` spec)
    freeze: str | Sequence[str] = DEFAULT_FREEZE  # layers kept as pretrained: ("conv1", "conv2") or "conv1,conv2"
    out: str | Path | None = None  # None: RUN/finetune-<layers>
    steps: int | None = None  # None: the supervised method's (pretrain.defaults_of), unless epochs
    epochs: int | None = None  # instead of steps: epochs over the training images
    batch_size: int | None = None  # None: the supervised method's (pretrain.defaults_of)
    lr: float | None = None  # None: the supervised method's (AlexNet: pretrain.default_lr)
    image_size: int | None = None  # folder images read at S x S; None: 32 for the cifar trunk, else 256
    seed: int = 0  # the re-initialised layers, the batches and the probes
    device: str = "auto"
    protocol: str | None = None  # probe protocol; None: the trunk's (DEFAULT_PROTOCOL)
    probe_epochs: int | None = None  # None: the protocol's
    subset: int | None = None  # class-balanced subset of the training images
    test_subset: int | None = None  # class-balanced subset of the test images
    workers: int | None = None  # data-loading processes of the probes
    sync_bn: bool = False  # under torchrun: BatchNorm of the trained layers over the global batch
    resume: bool = False  # continue the fine-tuning in OUT from its last checkpoint
    progress: bool | None = None  # None: bars on a terminal; False: no bars and no progress lines
    stop_after: int | None = None  # stop (checkpointed) after this many steps: tests and debugging


def parse_freeze(text: str, taps: Sequence[str]) -> list[str]:
    """'conv1,conv2' -> ['conv1', 'conv2'], checked against the trunk's taps (in the trunk's order)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in taps]
    if unknown or not names:
        raise UserError(f"--freeze {text!r}: "
                        f"{'unknown layer(s) ' + ', '.join(unknown) if unknown else 'names no layer'}"
                        f"; this trunk has {', '.join(taps)}")
    return [t for t in taps if t in names]


def finetune(config: FinetuneConfig) -> ProbeResult | None:
    """Fine-tune, save OUT/trunk.pt, probe; returns the probe result (what results.json holds).

    Returns None when the run stopped early at `stop_after` (checkpointed: resume it with
    `resume=True`). A run that was fine-tuned and probed before returns its stored result.
    Raises UserError for bad settings (before anything is written) and TrainingStopped when
    training cannot go on."""
    quiet = config.progress is False
    # every setting is checked before anything is written
    pretrained, source_meta = load_trunk(config.run_dir)
    freeze = config.freeze if isinstance(config.freeze, str) else ",".join(config.freeze)
    frozen = parse_freeze(freeze, pretrained.tap_names)
    device = setup(resolve_device(config.device))  # joins torchrun's process group, if any
    protocol = get_protocol(config.protocol or DEFAULT_PROTOCOL.get(pretrained.arch, "cifar"))
    check_trunk(pretrained, protocol, str(config.run_dir))
    protocol = protocol.with_overrides(epochs=config.probe_epochs)
    run_dir = Path(config.run_dir)
    default_out = (run_dir if run_dir.is_dir() else run_dir.parent) / f"finetune-{'-'.join(frozen)}"
    out = Path(config.out) if config.out else default_out
    if out.is_dir() and is_main():
        runs.lock_run_dir(out)  # a run directory in use is refused at once, naming the process that has it
    if (out / "last.pt").exists() and not config.resume:
        raise UserError(f"{out} already holds a fine-tuning run; pass --resume to continue it or choose another --out")
    if config.resume and not (out / "config.json").exists():
        raise UserError(f"--resume: {out} holds no fine-tuning run to resume (no config.json)")

    train_set, test_set = load_pair(config.data)
    if config.subset:
        train_set = subset(train_set, config.subset, seed=config.seed)
    if config.test_subset:
        test_set = subset(test_set, config.test_subset, seed=config.seed)
    size = config.image_size or (32 if pretrained.input_size <= 64 else 256)
    source = dataset_source(train_set, labelled=True, size=size, seed=config.seed)
    batch_size = config.batch_size or defaults_of("supervised").batch_size
    spe = steps_per_epoch(source, batch_size)  # refuses a training set smaller than one batch
    assert spe is not None  # a dataset is finite
    total_steps = config.epochs * spe if config.epochs is not None else config.steps or defaults_of("supervised").steps

    trunk = reinitialised_trunk(pretrained, frozen, config.seed)
    if config.sync_bn and world()[1] > 1:
        # only the trained layers: frozen BatchNorms stay in eval mode and never compute batch statistics
        for name in trunk.tap_names:
            if name not in frozen:
                sync_batchnorm(trunk.stages[name], device)
    lr = config.lr or default_lr("supervised", trunk.arch)
    method_config = SupervisedConfig(num_classes=len(train_set.classes), **({"lr": lr} if lr else {}))
    method = FineTune(trunk, total_steps, method_config, frozen)
    reinitialised = [t for t in trunk.tap_names if t not in frozen] + ["head"]
    settings = {
        "command": "finetune", "source_run": str(config.run_dir), "source_meta": source_meta,
        "arch": trunk.arch, "arch_config": trunk.config, "frozen": frozen,
        "reinitialised": reinitialised,
        "data": config.data, "subset": config.subset, "test_subset": config.test_subset, "image_size": size,
        "method_config": asdict(method_config), "seed": config.seed, "batch_size": batch_size,
        "total_steps": total_steps, "source": source.describe(), "protocol": protocol.to_dict(), "device": str(device),
    }
    # only now, with every setting checked: bad input leaves no empty run directory behind
    if is_main():
        runs.lock_run_dir(out)  # torchrun's other processes share rank 0's run directory
    else:
        runs.ensure_writable_dir(out)
    if config.resume:
        runs.check_settings(out / "config.json", settings, "--resume: the options differ from the fine-tuning "
                            f"run in {out} ({{changed}})", ignore=("device",), what="fine-tuning configuration")
    elif is_main():
        runs.write_json(out / "config.json", {**settings, "environment": runs.environment()})

    probe_dir = out / probe_dir_name(protocol.name, config.data)
    if (probe_dir / "results.json").exists():
        log.info(f"fine-tuned and probed before: {probe_dir / 'results.json'}")
        return runs.read_json(probe_dir / "results.json", "probe result")
    if not quiet and is_main():
        log.info(f"finetune {config.run_dir}: {', '.join(frozen)} frozen, {', '.join(reinitialised)} "
                 f"re-initialised (seed {config.seed}); {total_steps} steps of {batch_size} on {config.data} -> {out}")
    loop = LoopConfig(total_steps=total_steps, batch_size=batch_size, seed=config.seed,
                      checkpoint_every=max(1, min(100, total_steps // 10)), stop_after=config.stop_after)
    trained = train(method, source, loop, out, device, progress=config.progress)
    if not trained["finished"]:
        if is_main():
            log.info(f"stopped after {trained['step']} of {total_steps} steps; rerun with --resume to continue")
        return None
    meta = {"method": "finetune", "frozen": frozen, "source_run": str(config.run_dir), "source_meta": source_meta,
            "data": config.data, "seed": config.seed, "total_steps": total_steps}
    if is_main():
        save_trunk(out / "trunk.pt", method.trunk, meta)
    result = probe(method.trunk, train_set, test_set, protocol, device=device, seed=config.seed, out_dir=None,
                   progress=not quiet, verbose=not quiet, meta=meta, dataset=config.data, workers=config.workers)
    if is_main():
        write_results(probe_dir, result)
        if not quiet:
            log.info(f"fine-tuned -> {out / 'trunk.pt'}; probes -> {probe_dir / 'results.json'}")
    return result
