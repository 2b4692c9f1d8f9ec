"""Per-layer learning curves during pretraining (`monossl pretrain --probe-every N`).

Every N steps the training loop hands the method to a `CurveProbe`, which trains quick linear
probes of every tap (the trunk's usual protocol, e.g. `cifar`, with cached features) on a small
class-balanced split of the probe dataset's *training* images (5,000 train / 1,000 validation by
default: the test set is never touched) and returns top-1 per tap. The loop logs the result as
an `{"event": "probe", "step": s, ...}` line in metrics.jsonl; `runs.curve_records` reads them back
and `viz.plots.write_learning_curves` draws accuracy against steps, one line per layer.

Step 0 is the trunk before its first step: the random trunk, or, with `--whiten-conv1`, random
conv1 filters in the source's whitened coordinates, which already carry the source's patch
statistics (on CIFAR-10 that alone is worth several points at conv1). The probes
draw from their own seeded generators and work on a frozen copy of the trunk, so training with
and without curves gives the same weights.
"""

from __future__ import annotations

import time

import torch

from monossl.eval.probe import probe
from monossl.eval.protocols import DEFAULT_PROTOCOL, get_protocol
from monossl.methods.base import Method


class CurveProbe:
    """An evaluator of the training loop (train.train): `(method) -> {"top1": {tap: %}, "seconds": s}`
    for the method's trunk, on a fixed validation split, every `every` steps."""

    event = "probe"

    def __init__(self, data: str, arch: str, every: int, n_train: int = 5000, n_val: int = 1000, seed: int = 0,
                 epochs: int | None = None, device: str | torch.device = "cpu"):
        from monossl.data.datasets import load_dataset, validation_split

        self.protocol = get_protocol(DEFAULT_PROTOCOL.get(arch, "cifar")).with_overrides(epochs=epochs)
        self.train, self.val = validation_split(load_dataset(data, "train"), n_train, n_val, seed=seed)
        self.data, self.every, self.seed, self.device = data, every, seed, device

    def describe(self) -> dict:
        return {"data": self.data, "split": "train images only", "n_train": len(self.train),
                "n_val": len(self.val), "seed": self.seed, "protocol": self.protocol.name,
                "epochs": self.protocol.epochs}

    @staticmethod
    def summary(record: dict) -> str:
        return "top-1 " + " ".join(f"{k} {v:.1f}" for k, v in record["top1"].items()) + f" ({record['seconds']:.0f} s)"

    def __call__(self, method: Method) -> dict:
        t0 = time.perf_counter()
        result = probe(method.published_trunk(), self.train, self.val, self.protocol, device=self.device,
                       seed=self.seed, progress=False, verbose=False, workers=0)
        return {"top1": {k: v["top1"] for k, v in result["taps"].items()},
                "seconds": round(time.perf_counter() - t0, 2)}

