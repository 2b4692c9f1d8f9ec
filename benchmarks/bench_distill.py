"""Distillation throughput against RotNet's on the same trunk, measured in the same run.

A distillation step is the student's forward and backward pass plus the teacher's forward pass
(and a CutMix); a RotNet step is the trunk's forward and backward pass on 4 rotations of every
image. Both are timed on the CIFAR trunk (the teacher: the same architecture) and compared in
samples per second, a sample being one image through the trained trunk. Target: RotNet's
samples/s is at most 1.5x the distillation's.

    python benchmarks/bench_distill.py [--steps 20] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from monossl.device import memory_format
from monossl.methods.distill import Distill, DistillConfig
from monossl.methods.rotnet import RotNet
from monossl.models import build_trunk, save_trunk
from monossl.models.classifier import save_classifier


def samples_per_s(method, images, samples_per_image: int, steps: int) -> float:
    for i in range(3):
        method.step({"images": images}, i)  # warm-up (oneDNN picks its kernels)
    t0 = time.perf_counter()
    for i in range(steps):
        torch.manual_seed(i)
        method.step({"images": images}, i)
    return steps * len(images) * samples_per_image / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128, help="distillation images per step")
    p.add_argument("--rotnet-batch-size", type=int, default=64, help="RotNet images per step (x4 rotations)")
    args = p.parse_args()

    torch.manual_seed(0)
    fmt = memory_format(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        teacher_trunk = build_trunk("cifar")
        save_trunk(Path(tmp) / "trunk.pt", teacher_trunk)
        save_classifier(Path(tmp) / "classifier.pt", nn.Linear(teacher_trunk.feature_dim, 10))
        distill = Distill(build_trunk("cifar"), 10**6, DistillConfig(teacher=tmp)).to(memory_format=fmt)
    rotnet = RotNet(build_trunk("cifar"), 10**6).to(memory_format=fmt)
    distill.train(), rotnet.train()
    images = torch.rand(args.batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    rot_images = torch.rand(args.rotnet_batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    rot = samples_per_s(rotnet, rot_images, 4, args.steps)
    dis = samples_per_s(distill, images, 1, args.steps)
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}; CIFAR trunk, channels-last")
    print(f"RotNet:       {rot:8.1f} samples/s ({args.rotnet_batch_size} images x 4 rotations per step)")
    print(f"distillation: {dis:8.1f} samples/s ({args.batch_size} images per step, teacher forward included)")
    print(f"ratio RotNet/distillation: {rot / dis:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
