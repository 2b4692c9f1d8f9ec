"""Training throughput of every method against RotNet's on the same trunk, measured in the same run.

A sample is one image (or one view or crop of it) through the trained trunk: RotNet's step
trains on 4 rotations of every image, SimCLR and MoCo on 2 views, DINO on 2 global + 4 local
crops (the local ones at half the side), distillation on 1 CutMix image plus the teacher's
forward pass. Each method's steps are timed on the CIFAR trunk (channels-last) and compared in
samples/s. Targets: RotNet/distillation <= 1.5x (issue 14), RotNet/SimCLR, MoCo, DINO <= 2x.

    python benchmarks/bench_methods.py [--steps 20] [--methods rotnet,simclr,moco,dino,distill]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from monossl.device import memory_format
from monossl.models import build_trunk, save_trunk
from monossl.models.classifier import save_classifier
from monossl.pretrain import method_class

# images per step and samples per image (patch side 48 for the methods that crop views from it)
SETUPS = {"rotnet": (64, 4, 32), "simclr": (128, 2, 48), "moco": (128, 2, 48), "dino": (64, 6, 48),
          "distill": (128, 1, 32)}
TARGETS = {"distill": 1.5, "simclr": 2.0, "moco": 2.0, "dino": 2.0}


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
    p.add_argument("--methods", default=",".join(SETUPS))
    args = p.parse_args()
    names = ["rotnet"] + [m for m in args.methods.split(",") if m != "rotnet"]

    fmt = memory_format(torch.device("cpu"))
    rates = {}
    with tempfile.TemporaryDirectory() as teacher:  # distillation's teacher: the same trunk, random
        torch.manual_seed(0)
        trunk = build_trunk("cifar")
        save_trunk(Path(teacher) / "trunk.pt", trunk)
        save_classifier(Path(teacher) / "classifier.pt", nn.Linear(trunk.feature_dim, 10))
        for name in names:
            torch.manual_seed(0)
            cls = method_class(name)
            config = cls.Config(teacher=teacher) if name == "distill" else cls.Config()
            method = cls(build_trunk("cifar"), 10**6, config).to(memory_format=fmt)
            method.train()
            batch, per_image, side = SETUPS[name]
            images = torch.rand(batch, 3, side, side).contiguous(memory_format=fmt)
            rates[name] = samples_per_s(method, images, per_image, args.steps)
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}; CIFAR trunk, channels-last")
    for name, rate in rates.items():
        batch, per_image, side = SETUPS[name]
        ratio = rates["rotnet"] / rate
        target = f" (target <= {TARGETS[name]}x)" if name in TARGETS else ""
        print(f"{name:8s} {rate:8.1f} samples/s ({batch} images of {side} px x {per_image} per step); "
              f"RotNet/{name} = {ratio:.2f}x{target}")


if __name__ == "__main__":
    main()
