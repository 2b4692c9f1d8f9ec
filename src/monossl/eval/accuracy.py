"""How well a classifier (trunk + head) labels a labelled test set: top-1, top-5 and, given a teacher,
how often the two agree; `StudentEval` runs it during distillation (an evaluator of train.train).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from monossl.data.image_sets import LabelledImages
from monossl.methods.base import Method
from monossl.methods.distill import Distill


@torch.no_grad()
def classifier_accuracy(model: nn.Module, dataset: LabelledImages, device: str | torch.device = "cpu",
                        teacher: nn.Module | None = None, batch_size: int = 500) -> dict:
    """{"top1", "top5", "agreement" (with `teacher`, else None), "n"}: percentages over `dataset`
    (items (image in [0, 1], label)); `model` and `teacher` map images to logits. Eval mode is set
    for the call and restored after it."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = agree = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(1).sum().item()
        if teacher is not None:
            agree += (teacher(images).argmax(1) == top5[:, 0]).sum().item()
    model.train(was_training)
    n = len(dataset)
    return {"top1": round(100 * correct1 / n, 2), "top5": round(100 * correct5 / n, 2),
            "agreement": round(100 * agree / n, 2) if teacher is not None else None, "n": n}


class StudentEval:
    """Every `every` steps: the student's own head (the method as a classifier) on a labelled test set,
    and its agreement with the teacher. Logged as {"event": "student", "top1", "top5", "agreement"}."""

    event = "student"

    def __init__(self, test_set: LabelledImages, every: int, device: str | torch.device = "cpu", data: str = ""):
        self.test_set, self.every, self.device, self.data = test_set, every, device, data

    def describe(self) -> dict:
        return {"data": self.data, "split": "test", "n": len(self.test_set)}

    @staticmethod
    def summary(record: dict) -> str:
        return (f"top-1 {record['top1']:.1f}, top-5 {record['top5']:.1f}, agreement {record['agreement']:.1f} "
                f"({record['seconds']:.0f} s)")

    def __call__(self, method: Method) -> dict:
        assert isinstance(method, Distill)  # the student of a distillation: it has a teacher
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # evaluation draws nothing, but must not move the RNG
            result = classifier_accuracy(method, self.test_set, self.device, teacher=method.teacher)
        return {**result, "seconds": round(time.perf_counter() - t0, 2)}
