"""`monossl distill --teacher RUN --image builtin:NAME --out DIR`: distil a classifier through patches
of one image (monossl.eval.distillation)."""

from __future__ import annotations

import argparse

from monossl.cli import positive
from monossl.eval.distillation import DistillationConfig, distill
from monossl.methods.distill import TEACHER_SEES
from monossl.models import ARCHS


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True,
                   help="a finished `monossl pretrain --method supervised` run, "
                        "or torchvision:ARCH:WEIGHTS.pth[:size=S] "
                        "(a local state-dict file; never downloaded)")
    p.add_argument("--out", required=True, help="run directory of the student (rerun with --resume to continue)")
    p.add_argument("--image", action="append", default=None,
                   help="source image: a path, builtin:NAME or procedural:KIND (dead-leaves, noise, fractal[:one|:N], "
                        "spectral: docs/procedural.md); repeat for several; "
                        "omit to distil through --data's images")
    p.add_argument("--data", default=None, help="distil through this dataset's training images (labels unused)")
    p.add_argument("--eval-data", default="cifar10",
                   help="labelled test split the student is scored on (default cifar10)")
    p.add_argument("--preset", default="all", help="augmentation preset of the patch stream (default all)")
    p.add_argument("--arch", default="cifar", help=f"student trunk: {', '.join(ARCHS)} (default cifar)")
    p.add_argument("--widths", default=None, help="CIFAR trunk: channels of conv1..conv4")
    p.add_argument("--patch-size", type=positive(), default=None, help="patch side (default: the trunk's input)")
    p.add_argument("--steps", type=positive(), default=None, help="training steps (default 4000)")
    p.add_argument("--batch-size", type=positive(), default=None, help="images per step (default 128)")
    p.add_argument("--lr", type=positive(float), default=None, help="AdamW peak learning rate (default 0.01)")
    p.add_argument("--temperature", type=positive(float), default=8.0, help="softmax temperature T (default 8)")
    p.add_argument("--cutmix-alpha", type=positive(float), default=1.0, help="CutMix Beta(alpha, alpha) (default 1)")
    p.add_argument("--teacher-sees", default="mixed", choices=TEACHER_SEES,
                   help="mixed: the teacher labels the CutMix images (default); originals: its outputs on the "
                        "unmixed images are mixed in the boxes' proportions")
    p.add_argument("--whiten-conv1", action=argparse.BooleanOptionalAction, default=None,
                   help="student conv1 in the source's whitened coordinates (default: pretrain's)")
    p.add_argument("--eval-every", type=positive(), default=None,
                   help="steps between evaluations (default: 10 per run)")
    p.add_argument("--eval-subset", type=positive(), default=None,
                   help="evaluations during training on a class-balanced subset of N test images "
                        "(the final one uses all)")
    p.add_argument("--probe-every", type=positive(), default=None, help="also probe curves of every tap (as pretrain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--stop-after", type=positive(), default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    result = distill(DistillationConfig(
        teacher=args.teacher, out=args.out, images=args.image, data=args.data, eval_data=args.eval_data,
        preset=args.preset, patch_size=args.patch_size, arch=args.arch, widths=args.widths, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, temperature=args.temperature, cutmix_alpha=args.cutmix_alpha,
        teacher_sees=args.teacher_sees, whiten_conv1=args.whiten_conv1, eval_every=args.eval_every,
        eval_subset=args.eval_subset, probe_every=args.probe_every, seed=args.seed, device=args.device,
        resume=args.resume, stop_after=args.stop_after, progress=False if args.quiet else None))
    if result is None:
        print("stopped early; rerun with --resume to continue")
        return 0
    from monossl import runs
    from monossl.distributed import is_main

    if not is_main():
        return 0
    from monossl.viz.plots import write_learning_curves

    evals = runs.curve_records(runs.read_jsonl(f"{args.out}/metrics.jsonl"), "student")
    lines = [{"step": r["step"], "top1": {"student top-1": r["top1"], "agreement with the teacher": r["agreement"]}}
             for r in evals]
    source = ", ".join(args.image) if args.image else args.data
    write_learning_curves(lines, f"{args.out}/student_curve.png", ylabel=f"{args.eval_data} test (%)",
                          title=f"student distilled through {source}")
    s, t = result["student"], result["teacher"]
    print(f"student {s['top1']:.2f} top-1 / {s['top5']:.2f} top-5 on {result['eval_data']} test ({s['n']} images), "
          f"agreement with the teacher {s['agreement']:.2f}; teacher {t['top1']:.2f} top-1: "
          f"{100 * result['fraction_of_teacher']:.1f}% of the teacher -> {args.out}/student.json")
    return 0
