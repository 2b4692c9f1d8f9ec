"""TensorBoard and W&B tracking (tracking.py): the event files hold what metrics.jsonl holds, the conv1
filters as an image, no step twice after a resume; no event files without tensorboard; --wandb."""

import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from monossl.cli import main
from monossl.data.batches import TensorSource
from monossl.eval.curves import CurveProbe
from monossl.methods.rotnet import RotNet
from monossl.models import build_trunk, load_trunk
from monossl.pretrain import PretrainConfig, pretrain
from monossl.runs import read_jsonl
from monossl.tracking import conv1_filter_grid, scalars
from monossl.train import LoopConfig, train

CPU = torch.device("cpu")


def _events(run_dir) -> EventAccumulator:
    board = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def _points(board, tag) -> dict[int, float]:
    points = board.Scalars(tag)
    assert len({p.step for p in points}) == len(points), f"{tag}: a step twice"
    return {p.step: p.value for p in points}


def _tiny_config(out, **kw):
    return PretrainConfig(method="rotnet", out=out, images=["builtin:astronaut"], steps=4, batch_size=8,
                          progress=False, **kw)


def test_scalars_are_tagged_by_record_kind():
    assert scalars({"step": 3, "epoch": 0, "loss": 1.5, "lr": 0.1}) == {"train/epoch": 0.0, "train/loss": 1.5,
                                                                         "train/lr": 0.1}
    probe = {"step": 2, "event": "probe", "top1": {"conv1": 40.5, "conv2": 41.0}, "seconds": 1.25}
    assert scalars(probe) == {"probe/top1/conv1": 40.5, "probe/top1/conv2": 41.0, "probe/seconds": 1.25}
    # not numbers, and numbers TensorBoard cannot draw, are left out
    assert scalars({"step": 1, "loss": float("nan"), "note": "x", "ok": True}) == {}


def test_event_files_hold_the_metrics_the_probe_curves_and_the_filters(tmp_path, cifar_subset_dir, one_thread):
    curves = CurveProbe(f"cifar10:{cifar_subset_dir}", "cifar", every=2, n_train=100, n_val=50, epochs=1)
    run = pretrain(_tiny_config(tmp_path / "run"), evaluators=[curves])
    assert run.finished
    records = read_jsonl(run.out / "metrics.jsonl")
    board = _events(run.out)

    training = [r for r in records if "event" not in r]
    assert [r["step"] for r in training] == [4]  # log_every 10: the last step only
    keys = set(training[0]) - {"step"}
    assert {"loss", "rotation_acc", "lr", "images_per_s", "epoch"} <= keys
    assert {f"train/{k}" for k in keys} | {f"probe/top1/{t}" for t in ("conv1", "conv2", "conv3", "conv4")} \
        | {"probe/seconds"} == set(board.Tags()["scalars"])
    for key in keys:  # stored as float32
        assert _points(board, f"train/{key}") == {4: pytest.approx(float(training[0][key]), rel=1e-6)}
    probes = [r for r in records if r.get("event") == "probe"]
    assert [r["step"] for r in probes] == [0, 2, 4]
    for tap in ("conv1", "conv4"):
        assert _points(board, f"probe/top1/{tap}") == {r["step"]: pytest.approx(r["top1"][tap], rel=1e-6)
                                                         for r in probes}

    # the filter image: the finished trunk's conv1 (32 filters of 3x3, x4, 6 columns), as TensorBoard stores it
    assert board.Tags()["images"] == ["filters/conv1"]
    (image,) = board.Images("filters/conv1")
    assert image.step == 4 and (image.width, image.height) == (79, 79)
    drawn = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")).astype(int)
    trunk, _ = load_trunk(run.out)
    expected = (conv1_filter_grid(trunk).permute(1, 2, 0).numpy() * 255).clip(0, 255).astype(int)
    assert np.abs(drawn - expected).max() <= 1
    assert drawn.std() > 20  # filters, not a blank tile


class _InterruptedRotNet(RotNet):
    """RotNet that is interrupted (as by Ctrl-C) after `interrupt_at` steps, before that step's checkpoint."""

    interrupt_at = None

    def after_step(self, steps_done, run_dir):
        if steps_done == self.interrupt_at:
            raise KeyboardInterrupt


class _WeightProbe:
    """An evaluator whose numbers are a function of the weights: the same in any run that reaches them."""

    every, event = 2, "probe"

    def __call__(self, method):
        return {"top1": {"conv1": float(method.trunk.conv1.weight.detach().abs().sum())}}

    @staticmethod
    def summary(record):
        return str(record["top1"])


def _train(out, steps=8, interrupt_at=None):
    torch.manual_seed(0)
    method = _InterruptedRotNet(build_trunk("cifar", widths=(8, 8, 16, 16)), steps)
    method.interrupt_at = interrupt_at
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    loop = LoopConfig(total_steps=steps, batch_size=16, seed=1, log_every=1, checkpoint_every=3)
    return train(method, TensorSource(images, seed=1), loop, out, CPU, progress=False, evaluators=[_WeightProbe()])


def test_a_resumed_run_has_every_step_once_with_the_uninterrupted_values(tmp_path, one_thread):
    _train(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # after step 5 was logged; the last checkpoint is step 3's
        _train(tmp_path / "part", interrupt_at=5)
    interrupted = _events(tmp_path / "part")
    assert sorted(_points(interrupted, "train/loss")) == [1, 2, 3, 4, 5]
    assert _train(tmp_path / "part")["finished"]

    whole, resumed = _events(tmp_path / "whole"), _events(tmp_path / "part")
    assert set(resumed.Tags()["scalars"]) == set(whole.Tags()["scalars"])
    for tag in ("train/loss", "train/rotation_acc", "train/lr", "probe/top1/conv1"):
        assert _points(resumed, tag) == _points(whole, tag)  # every step once (checked in _points), same value
    assert sorted(_points(resumed, "train/loss")) == list(range(1, 9))
    assert sorted(_points(resumed, "probe/top1/conv1")) == [0, 2, 4, 6, 8]
    losses = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "part" / "metrics.jsonl") if "event" not in r}
    assert _points(resumed, "train/loss") == pytest.approx(losses, rel=1e-6)
    assert [i.step for i in resumed.Images("filters/conv1")] == [8]


def test_without_tensorboard_the_run_writes_no_event_files(tmp_path, monkeypatch, caplog, one_thread):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails
    caplog.set_level("INFO", logger="monossl")
    run = pretrain(_tiny_config(tmp_path / "run"))
    assert run.finished and run.trunk_path.is_file()
    assert not list(run.out.glob("*tfevents*"))
    assert "tensorboard is not installed" in caplog.text


def test_wandb_missing_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    argv = ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "2", "--batch-size", "8",
            "--out", str(tmp_path / "run"), "--quiet", "--wandb", "my-project"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == "monossl: error: --wandb needs the wandb package: pip install wandb\n"
    assert captured.out == "" and not (tmp_path / "run").exists()


def _fake_wandb():
    """A stand-in for the wandb module that records what it is given (nothing is contacted)."""
    fake = types.ModuleType("wandb")
    fake.inits, fake.logged, fake.finished = [], [], 0

    def init(**kw):
        fake.inits.append(kw)
        return types.SimpleNamespace(log=lambda data, step: fake.logged.append((step, data)), finish=finish)

    def finish():
        fake.finished += 1

    fake.init = init
    fake.Image = lambda array: ("image", array.shape)
    return fake


def test_wandb_gets_the_same_numbers_and_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch, one_thread):
    fake = _fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    assert not pretrain(_tiny_config(out, wandb="my-project", stop_after=2)).finished
    run = pretrain(_tiny_config(out, wandb="my-project", resume=True))
    assert run.finished and fake.finished == 2
    first, second = fake.inits
    assert first["project"] == "my-project" and first["config"]["method"] == "rotnet"
    assert first["id"] == second["id"] == (out / "wandb-id").read_text().strip()
    logged = {step: data for step, data in fake.logged if "train/loss" in data}
    records = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r}
    assert sorted(logged) == sorted(records) == [2, 4]
    for step, record in records.items():
        assert logged[step] == {f"train/{k}": float(v) for k, v in record.items() if k != "step"}
    assert (4, {"filters/conv1": ("image", (79, 79, 3))}) in fake.logged
