"""`monossl finetune RUN --freeze conv1,conv2 --data DATA`: fine-tune a pretrained trunk, then probe it.

PAPER.md §4 (Table 4): keep the named layers of a pretrained trunk exactly (weights and
BatchNorm running statistics), re-initialise everything else, train the trunk and a new linear
classifier with the labels of --data, then probe every tap with linear classifiers.

  * frozen stages: `requires_grad=False`, not in the optimiser (so no weight decay and no
    momentum touch them), and in eval mode throughout training (so their BatchNorm running
    statistics never move);
  * the other stages and the head: the trunk's own initialisation, drawn from --seed;
  * training: the supervised method and the one training loop (checkpoints, --resume);
  * OUT/trunk.pt, then OUT/probe-<protocol>/results.{json,md} as `monossl probe` writes them.

OUT defaults to RUN/finetune-<layers> (e.g. runs/rot/finetune-conv1-conv2).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from monossl import runs
from monossl.errors import UserError
from monossl.methods.supervised import Supervised, SupervisedConfig

DEFAULT_STEPS = 500  # as `monossl pretrain --method supervised`
DEFAULT_BATCH = 128


class FineTune(Supervised):
    """The supervised method on a trunk whose `frozen` stages keep their weights and statistics."""

    name = "finetune"

    def __init__(self, trunk, total_steps: int, config: SupervisedConfig, frozen: list[str]):
        self.frozen = tuple(frozen)
        for name in self.frozen:
            trunk.stages[name].requires_grad_(False)
        super().__init__(trunk, total_steps, config)
        # Only what trains goes into the optimiser: SGD's weight decay and momentum would otherwise
        # be the only things left that could touch a frozen weight.
        trainable = [p for p in self.parameters() if p.requires_grad]
        self._opt = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, nesterov=True,
                                    weight_decay=config.weight_decay)

    def train(self, mode: bool = True):
        # the loop puts the method in training mode; frozen BatchNorm layers stay in eval mode
        # (running statistics used, never updated)
        super().train(mode)
        for name in self.frozen:
            self.trunk.stages[name].eval()
        return self


def parse_freeze(text: str, taps) -> list[str]:
    """'conv1,conv2' -> ['conv1', 'conv2'], checked against the trunk's taps (in the trunk's order)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in taps]
    if unknown or not names:
        raise UserError(f"--freeze {text!r}: {'unknown layer(s) ' + ', '.join(unknown) if unknown else 'names no layer'}"
                        f"; this trunk has {', '.join(taps)}")
    return [t for t in taps if t in names]


def reinitialised_trunk(pretrained, frozen: list[str], seed: int):
    """A fresh trunk of the same architecture (its own initialisation, drawn from `seed`) holding
    the pretrained trunk's `frozen` stages: weights and BatchNorm statistics, copied exactly."""
    from monossl.models import build_trunk

    torch.manual_seed(seed)
    trunk = build_trunk(pretrained.arch, **pretrained.config)
    for name in frozen:
        trunk.stages[name].load_state_dict(pretrained.stages[name].state_dict())
    return trunk


def configure(p: argparse.ArgumentParser) -> None:
    from monossl.cli import positive
    from monossl.data.datasets import SPEC_HELP
    from monossl.eval.probes import PROTOCOLS

    p.add_argument("run_dir", help="the pretrained run (a directory holding trunk.pt, or the file)")
    p.add_argument("--freeze", default="conv1,conv2",
                   help="comma-separated layers kept as pretrained (weights and BatchNorm statistics); default conv1,conv2")
    p.add_argument("--data", required=True, help=f"labelled dataset to fine-tune and probe on: {SPEC_HELP}")
    p.add_argument("--out", default=None, help="output directory (default RUN/finetune-<layers>)")
    p.add_argument("--steps", type=positive(), default=None, help=f"fine-tuning steps (default {DEFAULT_STEPS})")
    p.add_argument("--epochs", type=positive(), default=None, help="fine-tuning epochs over --data's training images "
                   "(instead of --steps)")
    p.add_argument("--batch-size", type=positive(), default=None, help=f"images per step (default {DEFAULT_BATCH})")
    p.add_argument("--lr", type=positive(float), default=None,
                   help=f"base learning rate (default {SupervisedConfig.lr}; AlexNet 0.01)")
    p.add_argument("--image-size", type=positive(), default=None,
                   help="folder images are read at S x S before the random-resized crop (default 256 for AlexNet, "
                        "32 for the cifar trunk)")
    p.add_argument("--seed", type=int, default=0, help="seed of the re-initialised layers, the batches and the probes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="probe protocol (default: the trunk's: asano-max for AlexNets, cifar for the cifar trunk)")
    p.add_argument("--probe-epochs", type=positive(), default=None, help="probe epochs (default: the protocol's)")
    p.add_argument("--subset", type=positive(), default=None, metavar="N",
                   help="fine-tune and probe on a class-balanced subset of N training images")
    p.add_argument("--test-subset", type=positive(), default=None, metavar="N",
                   help="evaluate the probes on a class-balanced subset of N test images")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes of the probes")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm of the trained layers over the global batch")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning in OUT from its last checkpoint")
    p.add_argument("--stop-after", type=positive(), default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from monossl.data.batches import dataset_source
    from monossl.data.datasets import load_pair, subset
    from monossl.device import resolve_device
    from monossl.distributed import is_main, setup, sync_batchnorm, world
    from monossl.eval.probes import (
        DEFAULT_PROTOCOL,
        check_trunk,
        get_protocol,
        run_probe,
        write_results,
    )
    from monossl.models import load_trunk, save_trunk
    from monossl.train import LoopConfig, steps_per_epoch, train

    # every option is checked before anything is written
    pretrained, source_meta = load_trunk(args.run_dir)
    frozen = parse_freeze(args.freeze, pretrained.tap_names)
    device = setup(resolve_device(args.device))  # joins torchrun's process group, if any
    protocol = get_protocol(args.protocol or DEFAULT_PROTOCOL.get(pretrained.arch, "cifar"))
    check_trunk(pretrained, protocol, str(args.run_dir))
    protocol = protocol.with_overrides(epochs=args.probe_epochs)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else (run_dir if run_dir.is_dir() else run_dir.parent) / f"finetune-{'-'.join(frozen)}"
    if out.is_dir() and is_main():
        runs.lock_run_dir(out)  # a run directory in use is refused at once, naming the process that has it
    if (out / "last.pt").exists() and not args.resume:
        raise UserError(f"{out} already holds a fine-tuning run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / "config.json").exists():
        raise UserError(f"--resume: {out} holds no fine-tuning run to resume (no config.json)")

    train_set, test_set = load_pair(args.data)
    if args.subset:
        train_set = subset(train_set, args.subset, seed=args.seed)
    if args.test_subset:
        test_set = subset(test_set, args.test_subset, seed=args.seed)
    size = args.image_size or (32 if pretrained.input_size <= 64 else 256)
    source = dataset_source(train_set, labelled=True, size=size, seed=args.seed)
    batch_size = args.batch_size or DEFAULT_BATCH
    spe = steps_per_epoch(source, batch_size)  # refuses a training set smaller than one batch
    total_steps = args.epochs * spe if args.epochs is not None else args.steps or DEFAULT_STEPS

    trunk = reinitialised_trunk(pretrained, frozen, args.seed)
    if args.sync_bn and world()[1] > 1:
        # only the trained layers: frozen BatchNorms stay in eval mode and never compute batch statistics
        for name in trunk.tap_names:
            if name not in frozen:
                sync_batchnorm(trunk.stages[name], device)
    from monossl.pretrain import default_lr

    lr = args.lr or default_lr("supervised", trunk.arch)
    config = SupervisedConfig(num_classes=len(train_set.classes), **({"lr": lr} if lr else {}))
    method = FineTune(trunk, total_steps, config, frozen)
    settings = {
        "command": "finetune", "source_run": str(args.run_dir), "source_meta": source_meta,
        "arch": trunk.arch, "arch_config": trunk.config, "frozen": frozen,
        "reinitialised": [t for t in trunk.tap_names if t not in frozen] + ["head"],
        "data": args.data, "subset": args.subset, "test_subset": args.test_subset, "image_size": size,
        "method_config": asdict(config), "seed": args.seed, "batch_size": batch_size, "total_steps": total_steps,
        "source": source.describe(), "protocol": protocol.to_dict(), "device": str(device),
    }
    # only now, with every option checked: bad input leaves no empty run directory behind
    if is_main():
        runs.lock_run_dir(out)  # torchrun's other processes share rank 0's run directory
    else:
        runs.ensure_writable_dir(out)
    if args.resume:
        previous = runs.read_json(out / "config.json", "fine-tuning configuration")
        changed = [k for k in settings if k != "device"
                   and json.dumps(previous.get(k), default=str) != json.dumps(settings[k], default=str)]
        if changed:
            raise UserError(f"--resume: the options differ from the fine-tuning run in {out} ({', '.join(changed)})")
    elif is_main():
        runs.write_json(out / "config.json", {**settings, "environment": runs.environment()})

    probe_dir = out / f"probe-{protocol.name}"
    if (probe_dir / "results.json").exists():
        print(f"fine-tuned and probed before: {probe_dir / 'results.json'}")
        return 0
    if not args.quiet and is_main():
        print(f"finetune {args.run_dir}: {', '.join(frozen)} frozen, {', '.join(settings['reinitialised'])} "
              f"re-initialised (seed {args.seed}); {total_steps} steps of {batch_size} on {args.data} -> {out}")
    loop = LoopConfig(total_steps=total_steps, batch_size=batch_size, seed=args.seed,
                      checkpoint_every=max(1, min(100, total_steps // 10)), stop_after=args.stop_after)
    result = train(method, source, loop, out, device, progress=False if args.quiet else None)
    if not result["finished"]:
        if is_main():
            print(f"stopped after {result['step']} of {total_steps} steps; rerun with --resume to continue")
        return 0
    meta = {"method": "finetune", "frozen": frozen, "source_run": str(args.run_dir), "source_meta": source_meta,
            "data": args.data, "seed": args.seed, "total_steps": total_steps}
    if is_main():
        save_trunk(out / "trunk.pt", method.trunk, meta)
    probe = run_probe(method.trunk, train_set, test_set, protocol, device=device, seed=args.seed, out_dir=None,
                      progress=not args.quiet, verbose=not args.quiet, meta=meta, dataset=args.data,
                      workers=args.workers)
    if not is_main():
        return 0
    write_results(probe_dir, probe)
    if not args.quiet:
        print(f"fine-tuned -> {out / 'trunk.pt'}; probes -> {probe_dir / 'results.json'}")
    return 0
