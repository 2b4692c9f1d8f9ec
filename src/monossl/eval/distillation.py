"""Distil a teacher into a student through unlabelled images: `distill(DistillationConfig) -> dict`
(`monossl distill`).

The student (a fresh trunk of `arch` plus a class head) is pretrained with the `distill` method
(methods/distill.py) on the patch stream of `images` (one image, several, or a procedural source)
or on `data`'s images without labels, and its own head is evaluated on `eval_data`'s labelled test
split every `eval_every` steps and at the end, beside the teacher's accuracy on the same images.
OUT/student.json holds the final numbers; OUT is an ordinary run directory (trunk.pt,
classifier.pt: the student can be probed, fine-tuned or distilled from like any run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from monossl import runs
from monossl.distributed import is_main
from monossl.errors import UserError
from monossl.pretrain import PretrainConfig, pretrain

if TYPE_CHECKING:
    from monossl.eval.curves import CurveProbe


@dataclass
class DistillationConfig:
    teacher: str  # models.teachers spec
    out: str | Path
    images: list[str] | None = None  # None: the images of `data` (without labels)
    data: str | None = None
    eval_data: str = "cifar10"  # labelled test split the student's head is scored on
    preset: str = "all"
    patch_overrides: dict = field(default_factory=dict)
    patch_size: int | None = None
    arch: str = "cifar"
    widths: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    temperature: float = 8.0
    cutmix_alpha: float = 1.0
    teacher_sees: str = "mixed"
    whiten_conv1: bool | None = None
    eval_every: int | None = None  # None: 10 evaluations over the run
    eval_subset: int | None = None  # class-balanced subset of the test split for the evaluations during training
    probe_every: int | None = None  # also probe curves of every tap (eval.curves)
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    stop_after: int | None = None
    progress: bool | None = None


def distill(config: DistillationConfig) -> dict | None:
    """Train (or resume) the student and score it; returns what OUT/student.json holds, or None when
    the run stopped early (`stop_after`)."""
    from monossl.data.datasets import load_dataset, subset
    from monossl.device import resolve_device
    from monossl.distributed import setup
    from monossl.eval.accuracy import StudentEval, classifier_accuracy
    from monossl.models.classifier import load_classifier
    from monossl.models.teachers import load_teacher
    from monossl.pretrain import defaults_of

    started = time.perf_counter()
    device = setup(resolve_device(config.device))
    teacher = load_teacher(config.teacher)  # checked before anything is written
    test_set = load_dataset(config.eval_data, "test")
    if len(test_set.classes) != teacher.num_classes:
        raise UserError(f"--teacher {config.teacher} has {teacher.num_classes} classes but --eval-data "
                        f"{config.eval_data} has {len(test_set.classes)}")
    steps = config.steps or defaults_of("distill").steps
    during = subset(test_set, config.eval_subset, seed=config.seed) if config.eval_subset else test_set
    evaluators: list[StudentEval | CurveProbe] = [
        StudentEval(during, config.eval_every or max(1, steps // 10), device, config.eval_data)]
    if config.probe_every:
        from monossl.eval.curves import CurveProbe

        evaluators.append(CurveProbe(config.eval_data, config.arch, config.probe_every, seed=config.seed,
                                     device=device))
    options = {"teacher": str(config.teacher), "temperature": config.temperature,
               "cutmix_alpha": config.cutmix_alpha, "teacher_sees": config.teacher_sees}
    run = pretrain(PretrainConfig(
        method="distill", out=config.out, arch=config.arch, widths=config.widths, images=config.images,
        preset=config.preset, patch_overrides=config.patch_overrides, patch_size=config.patch_size, data=config.data,
        steps=steps, batch_size=config.batch_size, lr=config.lr, whiten_conv1=config.whiten_conv1, seed=config.seed,
        device=config.device, resume=config.resume, stop_after=config.stop_after, method_options=options,
        progress=config.progress), evaluators=evaluators)
    if not run.finished:
        return None
    student = load_classifier(run.out)[0].to(device)
    teacher = teacher.to(device)
    result = {
        "student": classifier_accuracy(student, test_set, device, teacher=teacher),
        "teacher": classifier_accuracy(teacher, test_set, device),
        "eval_data": config.eval_data, "teacher_spec": str(config.teacher),
        "source": run.config["source"], "steps": run.config["total_steps"], "seed": config.seed,
        "seconds_this_invocation": round(time.perf_counter() - started, 1),
    }
    result["fraction_of_teacher"] = round(result["student"]["top1"] / max(result["teacher"]["top1"], 1e-9), 4)
    if is_main():
        runs.write_json(Path(run.out) / "student.json", {**result, "environment": runs.environment()})
    return result
