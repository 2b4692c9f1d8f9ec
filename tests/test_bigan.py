"""BiGAN: shapes (32 and 64 px), one CPU step moves E, G and D, the logged metrics, sample grids,
NaN and discriminator-wins stops through the training loop, exact resume, and pretrain wiring."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from monossl.data.batches import TensorSource
from monossl.errors import UserError
from monossl.methods.bigan import BiGAN, BiGANConfig
from monossl.models import build_trunk
from monossl.models.gan import Discriminator, Generator
from monossl.train import LoopConfig, train

CPU = torch.device("cpu")
METRICS = {"d_real", "d_fake", "d_loss", "g_loss", "e_loss", "eg_loss", "recon_ratio", "lr"}


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _bigan(steps=10, **config):
    torch.manual_seed(0)
    trunk = build_trunk("cifar", widths=(8, 8, 16, 16))
    small = dict(g_width=8, d_width=8, latent_dim=200)
    return BiGAN(trunk, steps, BiGANConfig(**{**small, **config}))


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminator_shapes(size):
    g = Generator(latent_dim=200, size=size, width=8)
    d = Discriminator(latent_dim=200, size=size, width=8)
    z = torch.rand(4, 200) * 2 - 1
    x = g(z)
    assert x.shape == (4, 3, size, size) and x.min() >= -1 and x.max() <= 1
    assert d(x, z).shape == (4,)


def test_encoder_shapes_and_latent_range():
    m = _bigan()
    assert m.config.image_size == 32  # the CIFAR trunk gets the 32-px MonoGAN
    x = torch.rand(5, 3, 32, 32)
    assert m.encode(x).shape == (5, 200)
    z = m.sample_latent(1000)
    assert z.shape == (1000, 200) and z.min() >= -1 and z.max() <= 1 and z.min() < -0.9 and z.max() > 0.9


def test_alexnet_path_uses_64px_gan():
    torch.manual_seed(0)
    trunk = build_trunk("alexnet-small", fc_dim=64)
    m = BiGAN(trunk, 4, BiGANConfig(g_width=8, d_width=8))
    assert m.config.image_size == 64 and m.generator(m.sample_latent(2)).shape == (2, 3, 64, 64)
    # E reads 112 px (resized from whatever comes), D and G work at 64 px
    assert m.config.encoder_size == 112 and m.encode(torch.rand(2, 3, 64, 64)).shape == (2, 200)
    assert _bigan().config.encoder_size == 32  # the CIFAR trunk: E at its own 32 px


def test_alexnet_encoder_at_112px_one_step_changes_e_g_and_d():
    torch.manual_seed(0)
    trunk = build_trunk("alexnet-small", fc_dim=64)
    m = BiGAN(trunk, 4, BiGANConfig(g_width=8, d_width=8))
    seen = {}

    def record(name, shape):  # a forward hook must return None (else it replaces the output)
        seen.setdefault(name, tuple(shape))

    trunk.stages["conv1"].register_forward_hook(lambda mod, inp, out: record("conv1_in", inp[0].shape))
    trunk.stages["conv5"].register_forward_hook(lambda mod, inp, out: record("conv5", out.shape))
    trunk.head.register_forward_hook(lambda mod, inp, out: record("features", out.shape))
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    out = m.step({"images": torch.rand(4, 3, 256, 256)}, 0)  # the AlexNet patch size
    # E: 112-px input, conv5 6x6 (13x13 at 224 px), the FC head's 64 features; G/D at 64 px
    assert seen == {"conv1_in": (4, 3, 112, 112), "conv5": (4, 256, 6, 6), "features": (4, 64)}
    assert m.generator(m.sample_latent(2)).shape == (2, 3, 64, 64) and m._grid_real.shape[-1] == 256
    assert set(out) == METRICS and all(torch.isfinite(torch.tensor(v)) for v in out.values())
    after = m.state_dict()
    for part in ("trunk.stages.conv1.", "trunk.stages.conv5.", "trunk.head.", "head.", "generator.", "discriminator."):
        assert any(not torch.equal(before[k], after[k]) for k in before
                   if k.startswith(part) and after[k].is_floating_point()), part


def test_one_step_changes_encoder_generator_and_discriminator():
    m = _bigan()
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    out = m.step({"images": torch.rand(8, 3, 32, 32)}, 0)
    assert set(out) == METRICS and all(isinstance(v, float) for v in out.values())
    assert 0 <= out["d_real"] <= 1 and 0 <= out["d_fake"] <= 1 and out["recon_ratio"] > 0
    assert abs(out["eg_loss"] - out["e_loss"] - out["g_loss"]) < 1e-5
    after = m.state_dict()
    changed = lambda prefix: any(not torch.equal(before[k], after[k]) for k in before  # noqa: E731
                                 if k.startswith(prefix) and after[k].is_floating_point())
    for part in ("trunk.stages.conv1", "head.", "generator.", "discriminator."):
        assert changed(part), part


def test_lr_constant_then_linear_decay():
    m = _bigan(steps=100)
    assert m.lr_at(0) == m.lr_at(49) == 2e-4
    assert m.lr_at(75) == pytest.approx(1e-4) and m.lr_at(100) == 0.0


def test_sample_grid_rows_and_png(tmp_path):
    m = _bigan(steps=4, sample_every=2, sample_count=4)
    m.train()
    m.step({"images": torch.rand(8, 3, 32, 32)}, 0)
    grid = m.sample_grid()
    assert grid.shape == (12, 3, 32, 32) and grid.min() >= 0 and grid.max() <= 1
    assert m.training  # restored after the eval-mode render
    m.after_step(1, tmp_path)
    assert not (tmp_path / "samples").exists()  # not a multiple of sample_every, not the end
    m.after_step(2, tmp_path)
    m.end_epoch(0, tmp_path)
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["epoch0000.png", "step000002.png"]
    with Image.open(tmp_path / "samples" / "step000002.png") as im:
        assert im.format == "PNG"
        png = np.asarray(im.convert("RGB"))
    # 4 columns x 3 rows of 32-px tiles with 1-px white gaps, enlarged 4x (nearest); each tile holds
    # its image of the grid (rows: real, G(E(x)), G(z)) in 8 bits
    assert png.shape == (4 * (3 * 33 + 1), 4 * (4 * 33 + 1), 3)
    small = png[::4, ::4]
    assert np.array_equal(png, small.repeat(4, 0).repeat(4, 1))
    assert (small[0] == 255).all() and (small[:, 33] == 255).all()
    expected = (grid * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for row in range(3):
        for col in range(4):
            y, x = 1 + 33 * row, 1 + 33 * col
            assert np.array_equal(small[y:y + 32, x:x + 32], expected[4 * row + col]), (row, col)


def test_nan_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    m = _bigan(steps=6)
    # from step 2 on a NaN learning rate (Adam refuses one at construction): D's update makes it NaN
    m.lr_at = lambda step: float("nan") if step >= 2 else 2e-4
    loop = LoopConfig(total_steps=6, batch_size=8, seed=0, log_every=1, checkpoint_every=1)
    with pytest.raises(UserError, match=r"training stopped: \w+ became nan at step 2; the last good checkpoint is "):
        train(m, TensorSource(_images()), loop, tmp_path, CPU, progress=False)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["training"]["model"].values() if v.is_floating_point())


def test_discriminator_winning_outright_stops_the_run(tmp_path):
    m = _bigan(steps=20, d_win_patience=3, d_win_margin=0.01)
    real_forward = m.discriminator.forward

    def certain(x, z):  # a discriminator that tells real pairs (first half) from generated ones with certainty
        b = x.shape[0] // 2
        sure = torch.cat([torch.full((b,), 30.0), torch.full((x.shape[0] - b,), -30.0)])
        return real_forward(x, z) * 0 + sure

    m.discriminator.forward = certain
    loop = LoopConfig(total_steps=20, batch_size=8, seed=0, log_every=1, checkpoint_every=1)
    with pytest.raises(UserError, match=r"discriminator has won outright for 3 consecutive steps \(steps 0-2"):
        train(m, TensorSource(_images()), loop, tmp_path, CPU, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2  # the step that stopped is not saved
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and log[-1]["d_real"] > 0.99 and log[-1]["d_fake"] < 0.01


def test_win_streak_resets_and_travels_in_checkpoints():
    m = _bigan(d_win_patience=3)
    m._check_discriminator(1.0, 0.0, 0)
    m._check_discriminator(1.0, 0.0, 1)
    m._check_discriminator(0.6, 0.4, 2)
    assert m.d_win_streak == 0
    m._check_discriminator(1.0, 0.0, 3)
    state = m.training_state()
    other = _bigan(d_win_patience=3)
    other.load_training_state(state)
    assert other.d_win_streak == 1


def test_resume_equals_uninterrupted(tmp_path):
    source = TensorSource(_images(), seed=1)

    def run(path, stop_after=None):
        m = _bigan(steps=5)
        loop = LoopConfig(total_steps=5, batch_size=8, seed=2, log_every=1, checkpoint_every=1, stop_after=stop_after)
        train(m, source, loop, path, CPU, progress=False)
        return m

    whole = run(tmp_path / "a")
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "b")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_pretrain_cli_bigan(tmp_path):
    from monossl.cli import main

    out = tmp_path / "bigan"
    assert main(["pretrain", "--method", "bigan", "--image", "builtin:astronaut", "--steps", "2", "--batch-size", "4",
                 "--widths", "8,8,16,16", "--lr", "1e-4", "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method_config"]["lr"] == 1e-4 and config["method_config"]["image_size"] == 32
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert METRICS <= set(log[-1]) and log[-1]["step"] == 2
    assert (out / "trunk.pt").exists()
