"""conv1 trained in the whitened space of its data's patches: Z whitens, folding keeps the function,
the optimiser updates U, and a whitened run resumes and saves an ordinary trunk."""

import json

import torch

from monossl.cli import main
from monossl.models import build_trunk, load_trunk
from monossl.models.whitening import conv1_patch_whitening, fold, is_whitened, whiten, zca_matrix


def test_zca_whitens_correlated_data():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    x = torch.randn(20000, 6, generator=g, dtype=torch.float64) @ mix.double()
    z = zca_matrix(x, eps=0.0)
    white = (x - x.mean(0)) @ z
    assert torch.allclose(white.T @ white / len(x), torch.eye(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(z, z.T)  # ZCA: symmetric, the whitening closest to the identity


def test_whitened_conv1_is_the_same_function_after_folding_and_trains_u():
    torch.manual_seed(0)
    trunk = build_trunk("cifar", widths=(8, 8, 16, 16)).eval()
    images = torch.rand(64, 3, 32, 32)
    zca = conv1_patch_whitening(trunk, images, n_patches=5000)
    assert zca.shape == (27, 27)
    before = trunk.conv1.weight.detach().clone()
    whiten(trunk, zca)
    assert is_whitened(trunk)
    assert torch.allclose(trunk.conv1.weight, (before.flatten(1) @ zca).view_as(before), atol=1e-6)
    x = torch.rand(4, 3, 32, 32)
    y = trunk(x)
    u = trunk.conv1.parametrizations.weight.original
    assert u.requires_grad and not trunk.conv1.parametrizations.weight[0].zca.requires_grad
    fold(trunk)
    assert not is_whitened(trunk) and torch.allclose(trunk(x), y, atol=1e-6)
    assert set(trunk.state_dict()) == set(build_trunk("cifar", widths=(8, 8, 16, 16)).state_dict())


def test_whitened_pretraining_resumes_and_saves_a_plain_trunk(tmp_path):
    argv = ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "4", "--batch-size", "8",
            "--widths", "8,8,16,16", "--quiet"]  # whitened: the default on the CIFAR trunk
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert main(argv + ["--out", str(tmp_path / "part"), "--stop-after", "2"]) == 0
    assert main(argv + ["--out", str(tmp_path / "part"), "--resume"]) == 0
    a, _ = load_trunk(tmp_path / "whole")
    b, _ = load_trunk(tmp_path / "part")
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name
    plain = ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "4", "--batch-size", "8",
             "--widths", "8,8,16,16", "--no-whiten-conv1", "--quiet", "--out", str(tmp_path / "plain")]
    assert main(plain) == 0
    c, _ = load_trunk(tmp_path / "plain")
    assert not torch.equal(a.conv1.weight, c.conv1.weight)  # the whitened run learned other filters
    assert json.loads((tmp_path / "whole" / "config.json").read_text())["whiten_conv1"] is True
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["whiten_conv1"] is False

def test_a_channels_last_whitened_conv1_keeps_the_trunk_channels_last():
    # an NCHW conv1 weight would turn every later activation NCHW (and each channels-last conv
    # would convert it back): a SimCLR step on the CIFAR trunk was 1.3x slower
    torch.manual_seed(0)
    trunk = build_trunk("cifar", widths=(8, 8, 16, 16)).eval()
    whiten(trunk, conv1_patch_whitening(trunk, torch.rand(16, 3, 32, 32), n_patches=2000))
    expected = trunk.conv1.weight.detach().clone()
    trunk.to(memory_format=torch.channels_last)
    weight = trunk.conv1.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert torch.allclose(weight, expected, atol=1e-6)
    acts = trunk.taps(torch.rand(2, 3, 32, 32), ["conv1", "conv2"])
    assert all(a.is_contiguous(memory_format=torch.channels_last) for a in acts.values())
