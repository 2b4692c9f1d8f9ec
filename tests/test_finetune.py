"""`monossl finetune`: frozen layers stay bit-identical (weights and BatchNorm statistics), the others
are re-initialised and trained, the probes of frozen taps equal those of the pretrained trunk,
bad --freeze names are one-line errors, and --resume equals an uninterrupted run."""

import dataclasses
import json

import pytest
import torch

from monossl.cli import main
from monossl.data.datasets import load_pair, subset
from monossl.eval.finetune import FinetuneConfig, finetune
from monossl.eval.probe import probe
from monossl.eval.protocols import get_protocol
from monossl.methods.finetune import FineTune, reinitialised_trunk
from monossl.methods.supervised import SupervisedConfig
from monossl.models import build_trunk, load_trunk

TINY = ["--steps", "4", "--batch-size", "16", "--probe-epochs", "1", "--subset", "100", "--test-subset", "50",
        "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft") / "rot"
    assert main(["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "4", "--batch-size", "8",
                 "--widths", "8,8,16,16", "--out", str(run), "--quiet"]) == 0
    return run


def _finetune(run, data_dir, *extra):
    return main(["finetune", str(run), "--freeze", "conv1,conv2", "--data", f"cifar10:{data_dir}", *TINY, *extra])


def _state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_frozen_layers_are_bit_identical_and_the_rest_is_retrained(tmp_path, pretrained, cifar_subset_dir):
    out = tmp_path / "ft"
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(out)) == 0
    before, after = _state(pretrained / "trunk.pt"), _state(out / "trunk.pt")
    frozen = [k for k in before if k.startswith(("stages.conv1.", "stages.conv2."))]
    assert any(k.endswith("running_mean") for k in frozen) and any(k.endswith("num_batches_tracked") for k in frozen)
    for k in frozen:  # weights, BatchNorm affine, running_mean/var and num_batches_tracked
        assert torch.equal(before[k], after[k]), k

    # the other layers: re-initialised from --seed (not the pretrained weights), then trained
    torch.manual_seed(0)
    fresh = build_trunk("cifar", widths=[8, 8, 16, 16], conv1_kernel=3).state_dict()
    for k in ("stages.conv3.1.0.weight", "stages.conv4.1.0.weight", "stages.conv4.1.1.running_mean"):
        assert not torch.equal(before[k], after[k]) and not torch.equal(fresh[k], after[k]), k
    assert after["stages.conv4.1.1.num_batches_tracked"] == 4  # 4 training steps, in train mode
    assert after["stages.conv2.1.1.num_batches_tracked"] == before["stages.conv2.1.1.num_batches_tracked"]

    config = json.loads((out / "config.json").read_text())
    assert config["frozen"] == ["conv1", "conv2"] and config["reinitialised"] == ["conv3", "conv4", "head"]
    assert config["source_run"] == str(pretrained) and config["source_meta"]["method"] == "rotnet"
    assert config["total_steps"] == 4 and config["protocol"]["name"] == "cifar" and "torch" in config["environment"]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and 0 <= log[-1]["acc"] <= 100

    # probes: written like `monossl probe`; a frozen tap probes exactly as in the pretrained trunk
    result = json.loads((out / "probe-cifar" / "results.json").read_text())
    assert list(result["taps"]) == ["conv1", "conv2", "conv3", "conv4"] and result["trunk"]["meta"]["frozen"] == [
        "conv1", "conv2"]
    assert (out / "probe-cifar" / "results.md").exists()
    train, test = load_pair(f"cifar10:{cifar_subset_dir}")
    reference = probe(load_trunk(pretrained)[0], subset(train, 100, seed=0), subset(test, 50, seed=0),
                      get_protocol("cifar").with_overrides(epochs=1), device="cpu", seed=0, verbose=False,
                      progress=False)
    for tap in ("conv1", "conv2"):
        assert result["taps"][tap]["top1"] == reference["taps"][tap]["top1"], tap


def test_frozen_parameters_are_outside_the_optimiser_and_stay_in_eval_mode():
    torch.manual_seed(0)
    pretrained = build_trunk("cifar", widths=(8, 8, 16, 16))
    trunk = reinitialised_trunk(pretrained, ["conv1"], seed=3)
    assert torch.equal(trunk.stages["conv1"][0].weight, pretrained.stages["conv1"][0].weight)
    assert not torch.equal(trunk.stages["conv2"][1][0].weight, pretrained.stages["conv2"][1][0].weight)
    method = FineTune(trunk, 2, SupervisedConfig(num_classes=10), ["conv1"])
    in_opt = {id(p) for g in method.optimizers()["sgd"].param_groups for p in g["params"]}
    frozen = {id(p) for p in trunk.stages["conv1"].parameters()}
    assert frozen and not frozen & in_opt
    assert in_opt == {id(p) for p in method.parameters() if p.requires_grad}
    method.train()
    assert not trunk.stages["conv1"].training and trunk.stages["conv2"].training and method.head.training


@pytest.mark.parametrize("freeze, message", [
    ("conv1,conv9", "--freeze 'conv1,conv9': unknown layer(s) conv9; this trunk has conv1, conv2, conv3, conv4"),
    ("conv5", "unknown layer(s) conv5"),
    (",", "names no layer"),
])
def test_bad_freeze_names_are_one_line_errors(tmp_path, pretrained, cifar_subset_dir, capsys, freeze, message):
    out = tmp_path / "ft"
    assert main(["finetune", str(pretrained), "--freeze", freeze, "--data", f"cifar10:{cifar_subset_dir}",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing written


def test_resume_equals_uninterrupted(tmp_path, pretrained, cifar_subset_dir, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(whole)) == 0
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(part), "--stop-after", "2") == 0
    assert (part / "last.pt").exists() and not (part / "trunk.pt").exists()
    capsys.readouterr()
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(part)) == 2  # not without --resume
    assert "--resume" in capsys.readouterr().err
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(part), "--resume", "--lr", "0.1") == 2
    err = capsys.readouterr().err
    assert "options differ" in err and "method_config" in err
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(part), "--resume") == 0
    a, b = _state(whole / "trunk.pt"), _state(part / "trunk.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert log == [2, 4]
    ra = json.loads((whole / "probe-cifar" / "results.json").read_text())["taps"]
    rb = json.loads((part / "probe-cifar" / "results.json").read_text())["taps"]
    assert {k: v["top1"] for k, v in ra.items()} == {k: v["top1"] for k, v in rb.items()}
    # a finished run: a rerun with --resume does nothing
    assert _finetune(pretrained, cifar_subset_dir, "--out", str(part), "--resume") == 0


def test_library_call_returns_none_when_stopped_then_the_result(tmp_path, pretrained, cifar_subset_dir, caplog):
    """`finetune(FinetuneConfig)` is what the CLI and the table runner call: a run stopped at
    stop_after returns None; resumed, it returns what results.json holds; a rerun returns it again."""
    out = tmp_path / "ft"
    config = FinetuneConfig(run_dir=pretrained, data=f"cifar10:{cifar_subset_dir}", freeze=("conv2", "conv1"),
                            out=out, steps=4, batch_size=16, probe_epochs=1, subset=100, test_subset=50, workers=0,
                            progress=False, stop_after=2)
    caplog.set_level("INFO", logger="monossl")  # the library logs; the CLI shows the log
    assert finetune(config) is None
    assert "stopped after 2 of 4 steps" in caplog.text
    assert json.loads((out / "config.json").read_text())["frozen"] == ["conv1", "conv2"]  # the trunk's order
    config = dataclasses.replace(config, stop_after=None, resume=True)
    result = finetune(config)
    stored = json.loads((out / "probe-cifar" / "results.json").read_text())
    assert result["taps"] == stored["taps"] and list(result["taps"]) == ["conv1", "conv2", "conv3", "conv4"]
    assert finetune(config) == stored  # done before: the stored result
    assert "fine-tuned and probed before" in caplog.text
