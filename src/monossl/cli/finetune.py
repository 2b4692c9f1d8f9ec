"""`monossl finetune RUN --freeze conv1,conv2 --data DATA`: fine-tune a pretrained trunk, then probe it.

Parses the options into a `FinetuneConfig` and calls `monossl.eval.finetune.finetune`, which
prints its progress and writes RUN/finetune-<layers>/ (or --out): trunk.pt and
probe-<protocol>/results.{json,md}.
"""

from __future__ import annotations

import argparse

from monossl.cli import positive
from monossl.data.datasets import SPEC_HELP
from monossl.eval.finetune import FinetuneConfig, finetune
from monossl.eval.protocols import PROTOCOLS
from monossl.methods.supervised import SupervisedConfig
from monossl.pretrain import defaults_of


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the pretrained run (a directory holding trunk.pt, or the file)")
    p.add_argument("--freeze", default="conv1,conv2",
                   help="comma-separated layers kept as pretrained (weights and BatchNorm statistics); "
                        "default conv1,conv2")
    p.add_argument("--data", required=True, help=f"labelled dataset to fine-tune and probe on: {SPEC_HELP}")
    p.add_argument("--out", default=None, help="output directory (default RUN/finetune-<layers>)")
    p.add_argument("--steps", type=positive(), default=None,
                   help=f"fine-tuning steps (default {defaults_of('supervised').steps})")
    p.add_argument("--epochs", type=positive(), default=None, help="fine-tuning epochs over --data's training images "
                   "(instead of --steps)")
    p.add_argument("--batch-size", type=positive(), default=None,
                   help=f"images per step (default {defaults_of('supervised').batch_size})")
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


def run(args: argparse.Namespace) -> int:
    # a stopped run (stop_after) has printed how to resume it; either way the command succeeded
    finetune(FinetuneConfig(
        run_dir=args.run_dir, data=args.data, freeze=args.freeze, out=args.out, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, seed=args.seed,
        device=args.device, protocol=args.protocol, probe_epochs=args.probe_epochs, subset=args.subset,
        test_subset=args.test_subset, workers=args.workers, sync_bn=args.sync_bn, resume=args.resume,
        progress=False if args.quiet else None, stop_after=args.stop_after,
    ))
    return 0
