"""ResNet-18 trunks: taps, the probes' pooled sizes, checkpoints, torchvision's names, and a short
pretraining and probe through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from monossl.cli import main
from monossl.eval.features import pooled_shapes
from monossl.eval.protocols import DEFAULT_PROTOCOL, get_protocol
from monossl.models import build_trunk, load_trunk, save_trunk
from monossl.models.resnet import torchvision_state_dict

from conftest import is_drawn_figure


@pytest.mark.parametrize("arch, side, shapes", [
    ("resnet18-cifar", 32, {"conv1": (64, 32, 32), "layer1": (64, 32, 32), "layer2": (128, 16, 16),
                            "layer3": (256, 8, 8), "layer4": (512, 4, 4)}),
    ("resnet18", 224, {"conv1": (64, 56, 56), "layer1": (64, 56, 56), "layer2": (128, 28, 28),
                       "layer3": (256, 14, 14), "layer4": (512, 7, 7)}),
])
def test_taps_pooled_sizes_and_checkpoint_round_trip(tmp_path, arch, side, shapes):
    torch.manual_seed(0)
    trunk = build_trunk(arch).eval()
    x = torch.rand(2, 3, side, side)
    assert {k: tuple(v.shape[1:]) for k, v in trunk.taps(x).items()} == shapes
    assert trunk(x).shape == (2, 512) and trunk.input_size == side
    sizes = [v["pooled_size"] for v in pooled_shapes(trunk, get_protocol(DEFAULT_PROTOCOL[arch])).values()]
    assert all(4096 <= s < 4096 * 1.2 for s in sizes) if side == 32 else all(9216 <= s <= 12800 for s in sizes)
    save_trunk(tmp_path / "trunk.pt", trunk)
    loaded, _ = load_trunk(tmp_path / "trunk.pt")
    assert loaded.arch == arch and torch.equal(loaded.eval()(x), trunk(x))


def test_weights_load_into_torchvision_and_give_the_same_features():
    torch.manual_seed(0)
    trunk = build_trunk("resnet18").eval()
    net = torchvision.models.resnet18(weights=None).eval()
    missing, unexpected = net.load_state_dict(torchvision_state_dict(trunk), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    net.fc = torch.nn.Identity()
    x = torch.rand(2, 3, 224, 224)
    normalised = (x - trunk.mean) / trunk.std  # the trunk normalises its input itself
    assert torch.allclose(net(normalised), trunk(x), atol=1e-5)


def test_pretrain_and_probe_a_cifar_resnet(tmp_path, cifar_subset_dir):
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "rotnet", "--arch", "resnet18-cifar", "--image", "builtin:astronaut",
                 "--steps", "2", "--batch-size", "4", "--out", str(run), "--quiet"]) == 0
    assert main(["probe", str(run), "--data", f"cifar10:{cifar_subset_dir}", "--epochs", "1", "--subset", "100",
                 "--test-subset", "50", "--quiet"]) == 0
    result = json.loads((run / "probe-resnet-cifar" / "results.json").read_text())
    assert list(result["taps"]) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert result["trunk"]["arch"] == "resnet18-cifar" and all(0 <= v["top1"] <= 100 for v in result["taps"].values())
    # filters: the stem's 64 3x3 filters, drawn like any trunk's
    from monossl.viz.filters import conv1_filters

    trunk, _ = load_trunk(run)
    assert torch.equal(conv1_filters(trunk, fold_bn=False), trunk.conv1.weight.detach())
    assert main(["filters", str(run), "--out", str(tmp_path / "filters.png")]) == 0
    assert is_drawn_figure(tmp_path / "filters.png")
