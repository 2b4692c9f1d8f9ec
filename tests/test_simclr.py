"""SimCLR: NT-Xent against a hand computation, the colour distortion, one step moves the trunk."""

import math

import torch

from monossl.methods.augment import colour_jitter
from monossl.methods.losses import nt_xent
from monossl.methods.simclr import SimCLR
from monossl.models import build_trunk


def test_nt_xent_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = 0.5
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    losses = []
    for i in range(6):
        positive = (i + 3) % 6
        others = [j for j in range(6) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / t) for j in others)
        losses.append(-math.log(math.exp(float(z[i] @ z[positive]) / t) / denom))
    assert abs(nt_xent(z1, z2, t).item() - sum(losses) / 6) < 1e-5
    assert nt_xent(z1, z1 + 1e-3, 0.1) < nt_xent(z1, z2, 0.1)  # matching views: lower loss


def test_colour_jitter_off_is_identity_and_grey_is_grey():
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(colour_jitter(x, prob=0.0, grey_prob=0.0), x, atol=1e-6)
    grey = colour_jitter(x, prob=0.0, grey_prob=1.0)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-6)
    moved = colour_jitter(x, strength=0.4, prob=1.0, grey_prob=0.0, generator=torch.Generator().manual_seed(1))
    assert (moved - x).abs().mean() > 0.01 and moved.min() >= 0 and moved.max() <= 1


def test_one_step_moves_the_trunk():
    torch.manual_seed(0)
    method = SimCLR(build_trunk("cifar", widths=(8, 8, 16, 16)), total_steps=4)
    before = {k: v.clone() for k, v in method.trunk.state_dict().items()}
    out = method.step({"images": torch.rand(8, 3, 40, 40)}, 0)
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    moved = [k for k, v in method.trunk.state_dict().items() if k.endswith("weight") and not torch.equal(v, before[k])]
    assert "stages.conv1.0.weight" in moved and "stages.conv4.1.0.weight" in moved
