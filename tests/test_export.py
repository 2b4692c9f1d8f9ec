"""`monossl export`: ResNet-18 weights that load strictly into torchvision's and timm's resnet18 and give
the trunk's features; the model card's facts and probe numbers; refusals that write nothing."""

from __future__ import annotations

import json
import re
import sys

import pytest
import timm
import torch
import torchvision

from monossl.cli import main
from monossl.errors import UserError
from monossl.eval.model_card import export
from monossl.models import build_trunk, save_trunk
from monossl.models.trunks import MEAN, STD
from monossl.runs import write_json

SIDE = {"resnet18-cifar": 32, "resnet18": 224}
META = {"method": "simclr", "seed": 3, "total_steps": 7, "image": ["builtin:astronaut"], "preset": "all"}


def _scramble(trunk, seed=0):
    """Random BatchNorm statistics and affine parameters: with fresh ones (0, 1, 1, 0) every BatchNorm
    is the same function, and a swapped key would go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.3 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return trunk.eval()


def _make_run(path, arch="resnet18-cifar", config=True, **trunk_config):
    torch.manual_seed(0)
    trunk = _scramble(build_trunk(arch, **trunk_config))
    save_trunk(path / "trunk.pt", trunk, META)
    if config:
        write_json(path / "config.json", {
            "method": "simclr", "arch": arch, "arch_config": trunk.config, "seed": 3, "batch_size": 16,
            "total_steps": 7, "method_config": {"lr": 0.1, "temperature": 0.5}, "whiten_conv1": False,
            "source": {"kind": "stream", "labelled": False}, "image": ["builtin:astronaut"], "preset": "all",
            "patch_config": {"size": 48}})
    return trunk


@pytest.fixture(scope="module", params=["resnet18-cifar", "resnet18"])
def run(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, _make_run(path, request.param)


def _library_model(arch, fmt):
    """The adapted library model, built here independently of monossl's own helper."""
    if fmt == "timm":
        model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    else:
        model = torchvision.models.resnet18(weights=None)
        model.fc = torch.nn.Identity()
    if arch == "resnet18-cifar":
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model.eval()


def _features(model, side, trunk_input=False):
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    if not trunk_input:  # the trunk normalises itself; the library model wants normalised input
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", ["torchvision", "timm"])
def test_weights_load_strictly_and_give_the_trunks_features(run, fmt, tmp_path, monkeypatch):
    path, trunk = run
    arch, side = trunk.arch, SIDE[trunk.arch]
    result = export(path, fmt, tmp_path / "out")
    weights = torch.load(result.weights, weights_only=True)
    assert isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
    expected = _features(trunk, side, trunk_input=True)
    assert expected.shape == (2, 512)

    model = _library_model(arch, fmt)
    model.load_state_dict(weights)  # strict
    assert torch.allclose(_features(model, side), expected, rtol=1e-4, atol=1e-5)

    # the card's own lines, run as a user would, from the export folder, build the same model
    card = (result.out / "MODEL_CARD.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert snippet == json.loads((result.out / "export.json").read_text())["loading"]
    monkeypatch.chdir(result.out)
    scope = {}
    exec(snippet, scope)
    assert torch.allclose(_features(scope["model"], side), expected, rtol=1e-4, atol=1e-5)


def test_the_feature_check_sees_a_swapped_key_and_a_wrong_stem(run, tmp_path):
    path, trunk = run
    side = SIDE[trunk.arch]
    weights = torch.load(export(path, "torchvision", tmp_path / "out").weights, weights_only=True)
    a, b = "layer1.0.bn1.running_var", "layer1.0.bn2.running_var"  # same shape: a strict load takes the swap
    swapped = {**weights, a: weights[b], b: weights[a]}
    model = _library_model(trunk.arch, "torchvision")
    model.load_state_dict(swapped)
    assert not torch.allclose(_features(model, side), _features(trunk, side, trunk_input=True), rtol=1e-2, atol=1e-3)
    other = "resnet18" if trunk.arch == "resnet18-cifar" else "resnet18-cifar"
    with pytest.raises(RuntimeError, match="conv1.weight"):
        _library_model(other, "torchvision").load_state_dict(weights)


def test_model_card_and_export_json_carry_the_runs_facts_and_probe_numbers(tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    out = export(run_dir, "timm").out
    assert out == run_dir / "export-timm"
    card = (out / "MODEL_CARD.md").read_text()
    assert "No probe results" in card

    taps = {"conv1": 41.2, "layer1": 47.5, "layer2": 52.25, "layer3": 55.0, "layer4": 53.75}
    write_json(run_dir / "probe-resnet-cifar" / "results.json", {
        "protocol": {"name": "resnet-cifar"}, "seed": 0, "dataset": "cifar10", "n_train": 500, "n_test": 200,
        "taps": {t: {"top1": v, "top5": 90.0} for t, v in taps.items()},
        "knn": {t: {"k20": v - 5, "k200": v - 6} for t, v in taps.items()}})
    result = export(run_dir, "timm")
    card = (result.out / "MODEL_CARD.md").read_text()
    for fact in ("simclr", "builtin:astronaut", "preset `all`", "48-px patches", "steps: 7 of batch 16",
                 "seed 3", "lr 0.1", "`resnet18-cifar`", "timm 1.0", "num_classes=0", "nn.Identity()"):
        assert fact in card, fact
    assert "Protocol `resnet-cifar` on cifar10 (500 train / 200 test" in card
    assert "| tap | linear top-1 | k-NN k20 top-1 | k-NN k200 top-1 |" in card
    assert "| layer2 | 52.2 | 47.2 | 46.2 |" in card and "| layer4 | 53.8 | 48.8 | 47.8 |" in card
    facts = json.loads((result.out / "export.json").read_text())
    assert facts == result.facts
    assert (facts["method"], facts["steps"], facts["seed"], facts["preset"]) == ("simclr", 7, 3, "all")
    [probe] = facts["probes"]
    assert probe["protocol"] == "resnet-cifar" and probe["dataset"] == "cifar10"
    assert probe["linear_top1"] == taps and probe["knn_top1"]["layer3"] == {"k20": 50.0, "k200": 49.0}
    assert len(facts["sha256"]) == 64 and facts["input"]["mean"] == list(MEAN)


def test_without_config_json_the_card_uses_the_checkpoints_record(tmp_path):
    _make_run(tmp_path, config=False)
    card = (export(tmp_path, "torchvision").out / "MODEL_CARD.md").read_text()
    assert "- method: simclr" in card and "steps: 7, seed 3" in card and "model.fc = torch.nn.Identity()" in card


def test_cli_prints_where_it_wrote_and_the_loading_lines(tmp_path, capsys):
    _make_run(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--format", "torchvision", "--out", str(tmp_path / "tv")]) == 0
    printed = capsys.readouterr().out
    assert f"-> {tmp_path / 'tv'}" in printed
    assert f"torch.load({str(tmp_path / 'tv' / 'weights.pth')!r}, weights_only=True)" in printed
    assert sorted(p.name for p in (tmp_path / "tv").iterdir()) == ["MODEL_CARD.md", "export.json", "weights.pth"]


def _refused(argv, capsys, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("arch, config, words", [
    ("cifar", {}, ("cifar trunks have no torchvision/timm twin", "resnet18-cifar, resnet18")),
    ("alexnet-small", {"fc_dim": 8}, ("alexnet-small trunks", "export takes resnet18-cifar, resnet18")),
    ("resnet18-cifar", {"sobel": True}, ("Sobel front-end", "--sobel")),
])
def test_trunks_without_a_library_twin_are_refused_and_nothing_is_written(tmp_path, capsys, arch, config, words):
    _make_run(tmp_path, arch, **config)
    before = sorted(p.name for p in tmp_path.iterdir())
    _refused(["export", str(tmp_path), "--format", "torchvision"], capsys, str(tmp_path / "trunk.pt"), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_format_missing_run_and_missing_trunk_are_refused(tmp_path, capsys):
    _make_run(tmp_path / "run")
    _refused(["export", str(tmp_path / "run"), "--format", "onnx"], capsys, "unknown --format 'onnx'", "timm")
    _refused(["export", str(tmp_path / "nowhere"), "--format", "timm"], capsys, f"no run directory at {tmp_path}")
    (tmp_path / "empty").mkdir()
    _refused(["export", str(tmp_path / "empty"), "--format", "timm"], capsys, "holds no trunk.pt")
    _refused(["export", str(tmp_path / "run")], capsys, "--format")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "trunk.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]


def test_timm_missing_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    _make_run(tmp_path)
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'timm>="):
        export(tmp_path, "timm")
    _refused(["export", str(tmp_path), "--format", "timm"], capsys, "needs the timm package")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "trunk.pt"]


def test_a_pretrained_run_exports_with_its_recorded_facts(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["pretrain", "--method", "rotnet", "--arch", "resnet18-cifar", "--image", "builtin:astronaut",
                 "--steps", "2", "--batch-size", "4", "--seed", "5", "--out", str(run_dir), "--quiet"]) == 0
    result = export(run_dir, "torchvision")
    facts = result.facts
    assert (facts["method"], facts["steps"], facts["seed"], facts["batch_size"]) == ("rotnet", 2, 5, 4)
    assert facts["images"] == ["builtin:astronaut"] and facts["preset"] == "all"
    card = (result.out / "MODEL_CARD.md").read_text()
    assert "- method: rotnet (" in card and "steps: 2 of batch 4, seed 5" in card
