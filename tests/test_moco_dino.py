"""MoCo v2 and DINO: their losses against hand computations, the queue and the centre, one step
moves every trained part, and a resumed run is bit-identical (queue, momentum encoder, centre)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from monossl.cli import main
from monossl.methods.dino import DINO, DINOConfig
from monossl.methods.losses import dino_loss, moco_infonce
from monossl.methods.moco import MoCo, MoCoConfig
from monossl.models import build_trunk


def test_moco_infonce_matches_a_hand_computation():
    q = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    k = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    queue = F.normalize(torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.7, 0.7]]), dim=1)
    t = 0.5
    expected = 0.0
    for i in range(2):
        logits = [float(q[i] @ k[i]) / t] + [float(q[i] @ queue[j]) / t for j in range(3)]
        expected += -logits[0] + math.log(sum(math.exp(x) for x in logits))
    assert moco_infonce(q, k, queue, t).item() == pytest.approx(expected / 2, rel=1e-5)


def test_dino_loss_matches_a_hand_computation_and_skips_same_crop_pairs():
    torch.manual_seed(0)
    student = [torch.randn(3, 5) for _ in range(3)]  # 2 global + 1 local crop
    teacher = [torch.randn(3, 5) for _ in range(2)]
    center = torch.randn(1, 5)
    ts, tt = 0.1, 0.04
    pairs = []
    for i in range(2):
        p = torch.softmax((teacher[i] - center) / tt, dim=1)
        for j in range(3):
            if i != j:
                pairs.append(-(p * torch.log_softmax(student[j] / ts, dim=1)).sum(1).mean())
    assert len(pairs) == 4
    assert dino_loss(student, teacher, center, ts, tt).item() == pytest.approx(torch.stack(pairs).mean().item(),
                                                                               rel=1e-5)


def test_moco_queue_is_a_ring_buffer():
    moco = MoCo(build_trunk("cifar", widths=[8, 8, 16, 16]), 10, MoCoConfig(queue_size=5, projection_dims=(8, 4)))
    first = torch.arange(12.0).view(3, 4)
    moco.enqueue(first)
    assert torch.equal(moco.queue[:3], first) and int(moco.queue_ptr) == 3
    second = -torch.arange(12.0).view(3, 4) - 1
    moco.enqueue(second)  # wraps: rows 3, 4, then 0
    assert torch.equal(moco.queue[3:5], second[:2]) and torch.equal(moco.queue[0], second[2])
    assert torch.equal(moco.queue[1:3], first[1:]) and int(moco.queue_ptr) == 1


def test_dino_centre_is_a_moving_average_of_the_teacher_outputs_and_the_momentum_rises_to_one():
    dino = DINO(build_trunk("cifar", widths=[8, 8, 16, 16]), 100, DINOConfig(out_dim=3, center_momentum=0.9))
    first = [torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[0.0, 0.0, 6.0], [0.0, 4.0, 2.0]])]
    dino.update_center(first)  # mean over both crops and all images: (1, 2, 3)
    assert torch.allclose(dino.center, torch.tensor([[0.1, 0.2, 0.3]]))
    dino.update_center([torch.tensor([[10.0, 0.0, 0.0]])])
    assert torch.allclose(dino.center, torch.tensor([[0.9 * 0.1 + 1.0, 0.9 * 0.2, 0.9 * 0.3]]))
    assert dino.teacher_momentum(0) == pytest.approx(0.996) and dino.teacher_momentum(100) == pytest.approx(1.0)
    assert dino.teacher_momentum(50) == pytest.approx(0.998)


@pytest.mark.parametrize("method", ["moco", "dino"])
def test_one_step_moves_the_trunk_the_momentum_copy_and_the_queue_or_centre(method):
    torch.manual_seed(0)
    trunk = build_trunk("cifar", widths=[8, 8, 16, 16])
    if method == "moco":
        m = MoCo(trunk, 10, MoCoConfig(queue_size=16, projection_dims=(16, 8)))
        copy_of, extra = m.key, "queue"
    else:
        m = DINO(trunk, 10, DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, local_crops=2))
        copy_of, extra = m.teacher, "center"
    before = {k: v.clone() for k, v in m.state_dict().items()}
    metrics = m.step({"images": torch.rand(8, 3, 48, 48)}, 0)
    assert math.isfinite(metrics["loss"])
    after = m.state_dict()
    assert not torch.equal(before["trunk.stages.conv1.0.weight"], after["trunk.stages.conv1.0.weight"])
    assert not torch.equal(before[extra], after[extra])
    name = next(k for k, _ in copy_of.named_parameters() if "conv1" in k)
    prefix = "key." if method == "moco" else "teacher."
    assert not torch.equal(before[prefix + name], after[prefix + name])  # the momentum copy followed
    assert not any(p.requires_grad for p in copy_of.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["moco", "dino"])
def test_a_resumed_run_is_bit_identical(tmp_path, method):
    argv = ["pretrain", "--method", method, "--image", "builtin:astronaut", "--widths", "8,8,16,16", "--steps", "6",
            "--batch-size", "8", "--quiet"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert main(argv + ["--out", str(tmp_path / "parts"), "--stop-after", "3"]) == 0
    assert main(argv + ["--out", str(tmp_path / "parts"), "--resume"]) == 0
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["training"]["model"]
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)["training"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # queue, key encoder, centre too


def test_dino_saves_its_teacher_as_the_trunk(tmp_path):
    from monossl.models import load_trunk

    assert main(["pretrain", "--method", "dino", "--image", "builtin:astronaut", "--widths", "8,8,16,16",
                 "--steps", "3", "--batch-size", "8", "--no-whiten-conv1", "--quiet", "--out", str(tmp_path)]) == 0
    model = torch.load(tmp_path / "last.pt", weights_only=True)["training"]["model"]
    saved = load_trunk(tmp_path)[0].state_dict()
    teacher = {k[len("teacher.trunk."):]: v for k, v in model.items() if k.startswith("teacher.trunk.")}
    student = {k[len("student.trunk."):]: v for k, v in model.items() if k.startswith("student.trunk.")}
    assert saved.keys() == teacher.keys() and all(torch.equal(saved[k], teacher[k]) for k in saved)
    assert any(not torch.equal(saved[k], student[k]) for k in saved)  # the teacher lags the student
