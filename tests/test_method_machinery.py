"""The machinery every method shares (methods/base.py): the default step, the EMA helper, defaults
in one place, options a method does not use refused, DINO's stabilisers, SimCLR's global negatives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from monossl.methods.base import Method, RunDefaults, ema_update
from monossl.methods.dino import DINO, DINOConfig
from monossl.methods.losses import nt_xent
from monossl.models import build_trunk
from monossl.pretrain import METHODS, defaults_of, method_class


def _trunk():
    torch.manual_seed(0)
    return build_trunk("cifar", widths=[8, 8, 16, 16])


def test_ema_update_against_a_hand_computation():
    torch.manual_seed(0)
    source, target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), nn.Sequential(nn.Linear(3, 2),
                                                                                         nn.BatchNorm1d(2))
    source[1].running_mean.fill_(0.5)
    t0 = {k: v.clone() for k, v in target.state_dict().items()}
    s0 = {k: v.clone() for k, v in source.state_dict().items()}
    ema_update(target, source, 0.9)
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        assert torch.allclose(target.state_dict()[k], 0.9 * t0[k] + 0.1 * s0[k]), k
    assert torch.equal(target[1].running_mean, torch.full((2,), 0.5))  # buffers are copied, not averaged
    assert torch.equal(source.state_dict()["0.weight"], s0["0.weight"])  # the source is untouched


class _Recorder(Method):
    """A one-layer method that records the order in which the default step calls it."""

    name = "recorder"

    def __init__(self, clip_grad: float = 0.0):
        super().__init__(nn.Linear(4, 1), total_steps=10)
        self.config = type("Config", (), {"lr": 0.5, "clip_grad": clip_grad})()
        self._opt = torch.optim.SGD(self.parameters(), lr=1.0)
        self.calls: list[str] = []
        self.grad_norm = None

    def optimizers(self):
        return {"sgd": self._opt}

    def loss(self, batch, step):
        self.calls.append("loss")
        return (self.trunk(batch["x"]) ** 2).mean() * 100, {"extra": 1.0}

    def before_update(self, step):
        self.calls.append("before")
        self.grad_norm = torch.cat([p.grad.flatten() for p in self.parameters()]).norm().item()

    def after_update(self, step):
        self.calls.append("after")


def _flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_default_step_runs_the_hooks_in_order_and_clips():
    torch.manual_seed(0)
    batch = {"x": torch.randn(8, 4) + 3}
    plain, clipped = _Recorder(), _Recorder(clip_grad=0.1)
    clipped.load_state_dict(plain.state_dict())
    start = _flat(plain)
    logs = plain.step(batch, 0)
    clipped.step(batch, 0)
    assert plain.calls == ["loss", "before", "after"]
    assert set(logs) == {"loss", "extra", "lr"} and logs["lr"] == pytest.approx(0.5)  # cosine at step 0
    # plain SGD at lr 0.5 moves the parameters by 0.5 x the gradient's norm; clipped, by 0.5 x 0.1
    assert plain.grad_norm > 1.0
    assert (_flat(plain) - start).norm().item() == pytest.approx(0.5 * plain.grad_norm, rel=1e-5)
    assert (_flat(clipped) - start).norm().item() == pytest.approx(0.05, rel=1e-4)


def test_every_method_keeps_its_defaults_in_its_class():
    for name in METHODS:
        assert isinstance(method_class(name).defaults, RunDefaults), name
    assert defaults_of("deepcluster").num_patches == 32768 and defaults_of("deepcluster").sobel
    assert defaults_of("simclr").patch_size == 48 and defaults_of("rotnet").alexnet_lr == 0.01


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "monossl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, message", [
    (["--method", "dino", "--crop-scale", "0.2,1"], "--method dino does not use --crop-scale"),
    (["--method", "simclr", "--clusters", "5"], "--method simclr does not use --clusters"),
    (["--method", "dino", "--method-option", "no_such=1"], "unknown option of --method dino 'no_such'"),
])
def test_an_option_the_method_does_not_use_is_refused_in_one_line(tmp_path, extra, message):
    out = tmp_path / "run"
    proc = _cli("pretrain", *extra, "--image", "builtin:astronaut", "--steps", "1", "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monossl: error:") and message in lines[0], proc.stderr
    assert not out.exists()  # nothing half-written


def test_method_options_reach_the_method_config(tmp_path):
    out = tmp_path / "run"
    proc = _cli("pretrain", "--method", "dino", "--method-option", "clip_grad=0", "--method-option",
                "freeze_last_layer=0", "--image", "builtin:astronaut", "--widths", "8,8,16,16", "--batch-size", "4",
                "--steps", "1", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())["method_config"]
    assert config["clip_grad"] == 0 and config["freeze_last_layer"] == 0 and config["teacher_temp"] == 0.04


def test_dino_teacher_temperature_warms_up_linearly():
    dino = DINO(_trunk(), 100, DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup=0.3))
    assert dino.teacher_temp(0) == pytest.approx(0.04)
    assert dino.teacher_temp(15) == pytest.approx(0.055)
    assert dino.teacher_temp(30) == dino.teacher_temp(99) == pytest.approx(0.07)


def test_dino_freezes_its_last_layer_then_trains_it():
    dino = DINO(_trunk(), 100, DINOConfig(freeze_last_layer=0.02, local_crops=2))
    last = [p.detach().clone() for p in dino.student.head.last.parameters()]
    mlp = dino.student.head.mlp[0].weight.detach().clone()
    batch = {"images": torch.rand(4, 3, 48, 48)}
    for step in (0, 1):  # the first 2% of 100 steps
        torch.manual_seed(step)
        dino.step(batch, step)
    assert all(torch.equal(a, b) for a, b in zip(last, dino.student.head.last.parameters()))
    assert not torch.equal(mlp, dino.student.head.mlp[0].weight)  # the rest trains
    torch.manual_seed(2)
    dino.step(batch, 2)
    assert not all(torch.equal(a, b) for a, b in zip(last, dino.student.head.last.parameters()))


def test_dino_multi_crop_runs_each_size_through_the_trunk_once():
    dino = DINO(_trunk(), 10)
    calls = []
    dino.trunk.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    out = dino.student([torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 16)])
    assert calls == [(4, 3, 32, 32), (2, 3, 16, 16)]
    assert [o.shape for o in out] == [torch.Size([2, 1024])] * 3


def test_learning_curves_probe_the_trunk_that_is_published(monkeypatch):
    """DINO's trunk.pt is the teacher's trunk: the curves probe that one, not the student's."""
    import monossl.eval.curves as curves

    seen = []
    monkeypatch.setattr(curves, "probe", lambda trunk, *a, **k: seen.append(trunk) or {"taps": {}})
    curve = object.__new__(curves.CurveProbe)
    curve.train = curve.val = curve.protocol = None
    curve.device, curve.seed = "cpu", 0
    dino = DINO(_trunk(), 10)
    curve(dino)
    assert seen == [dino.teacher.trunk] and dino.teacher.trunk is not dino.trunk


def test_simclr_negatives_span_the_global_batch():
    """What each of two ranks computes from its own pairs and the gathered batch averages to the one-
    process loss; taking negatives from a rank's own pairs only gives another loss."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    whole = nt_xent(z1, z2)
    ranks = [nt_xent(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4], 0.5, z1, z2, offset=r * 4) for r in (0, 1)]
    assert (ranks[0] + ranks[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-6)
    per_rank = [nt_xent(z1[r * 4:(r + 1) * 4], z2[r * 4:(r + 1) * 4]) for r in (0, 1)]
    assert abs((per_rank[0] + per_rank[1]).item() / 2 - whole.item()) > 0.1
