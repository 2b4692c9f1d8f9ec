"""Activation patterns of conv1 filters (viz.filters: patch_covariance, activation_patterns; viz.networks:
training_images, data_images; `monossl filters --patterns`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monossl.cli import main
from monossl.data.batches import permutation
from monossl.errors import UserError
from monossl.models import build_trunk, load_trunk, whitening
from monossl.viz import filters, networks
from monossl.viz.networks import Network

from conftest import is_drawn_figure

pytestmark = pytest.mark.usefixtures("one_thread")


def _unfolded(x, kernel):
    """Every patch of x (B, C, H, W) as a row, by F.unfold: the reference the helpers are checked against."""
    kh, kw = kernel
    return F.unfold(x, (kh, kw)).transpose(1, 2).reshape(-1, x.shape[1] * kh * kw)


def _flat_colour_images(reds=(0.2, 0.8), copies=8, size=12):
    """Flat images, red `reds` (equally often), green and blue 0.5: only red varies, and within a patch not at all."""
    images = torch.full((len(reds) * copies, 3, size, size), 0.5)
    images[:, 0] = torch.tensor(reds).repeat(copies).view(-1, 1, 1)
    return images


def _trunk_with_weight(weight, **config):
    trunk = build_trunk("cifar", conv1_kernel=weight.shape[-1], **config).eval()
    with torch.no_grad():
        trunk.conv1.weight.copy_(weight)
    return trunk


# ---------------------------------------------------------------------------- patches and covariance


def test_random_patches_are_unfolds_rows_in_a_seeded_order():
    x = torch.randn(40, 3, 11, 9)
    for kernel in [(3, 3), (5, 3), (1, 1)]:
        rows = _unfolded(x, kernel)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(7))
        assert torch.equal(whitening.random_patches(x, kernel, 500, seed=7), rows[order[:500]])  # what whitening took
        assert torch.equal(whitening.random_patches(x, kernel, 10 ** 6, seed=7), rows[order])  # all of them
    assert whitening.random_patches(x, (12, 3), 100).shape == (0, 108)  # no 12-px-tall patch in 11-px images
    torch.manual_seed(0)
    images = torch.rand(6, 3, 10, 10)
    for trunk in (build_trunk("cifar"), build_trunk("cifar", sobel=True, conv1_kernel=5)):
        k = trunk.conv1.kernel_size
        rows = _unfolded(trunk._input(images), k)  # as conv1 sees them: normalised, Sobel gradients if any
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))
        assert torch.equal(whitening.conv1_input_patches(trunk, images, 200, seed=3), rows[order[:200]])


def test_patch_covariance_is_numpy_cov_of_the_same_patches():
    torch.manual_seed(1)
    images = torch.rand(5, 3, 16, 16)
    trunk = build_trunk("cifar", conv1_kernel=5)
    patches = whitening.conv1_input_patches(trunk, images, 300, seed=2).double().numpy()
    cov = filters.patch_covariance(trunk, images, 300, seed=2)
    assert cov.dtype == torch.float64 and cov.shape == (75, 75)
    np.testing.assert_allclose(cov.numpy(), np.cov(patches.T, bias=True), rtol=1e-10, atol=1e-12)
    # a Sobel trunk: conv1's 2-channel k x k gradient patches; rgb=True: the normalised RGB (k+2) x (k+2)
    # patches its drawn (effective) filters read. With every patch taken, the order does not matter.
    sobel = build_trunk("cifar", sobel=True)
    every = 10 ** 6
    gradients = _unfolded(sobel._input(images), (3, 3)).double().numpy()
    np.testing.assert_allclose(filters.patch_covariance(sobel, images, every).numpy(),
                               np.cov(gradients.T, bias=True), rtol=1e-9, atol=1e-12)
    rgb = _unfolded((images - sobel.mean) / sobel.std, (5, 5)).double().numpy()
    np.testing.assert_allclose(filters.patch_covariance(sobel, images, every, rgb=True).numpy(),
                               np.cov(rgb.T, bias=True), rtol=1e-9, atol=1e-12)
    with pytest.raises(UserError, match="fewer than two 5x5 patches"):
        filters.patch_covariance(trunk, torch.rand(2, 3, 4, 4))


def test_flat_colour_images_give_the_known_covariance_and_patterns():
    """Red 0.2 or 0.8 (equally often), green and blue fixed: after normalisation the red values are
    +-0.3 / std_R, so C is 0.09 / std_R^2 on every pair of red weights and 0 elsewhere, and the pattern
    of any filter is flat red: 0.09 / std_R^2 x the sum of its red weights; green and blue 0."""
    trunk = build_trunk("cifar").eval()
    std_r = float(trunk.std.flatten()[0])
    cov = filters.patch_covariance(trunk, _flat_colour_images(), 10 ** 6)
    expected = torch.zeros(27, 27, dtype=torch.float64)
    expected[:9, :9] = 0.09 / std_r ** 2  # the 9 red weights come first (flattened like conv1's weight)
    torch.testing.assert_close(cov, expected, rtol=1e-6, atol=1e-12)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    pattern = filters.activation_patterns(w, cov)
    red = 0.09 / std_r ** 2 * w[:, 0].sum((1, 2))
    torch.testing.assert_close(pattern[:, 0], red.view(4, 1, 1).expand(4, 3, 3), rtol=1e-6, atol=1e-12)
    assert pattern[:, 1:].abs().max() < 1e-12


def test_activation_patterns_are_covariance_times_filter():
    torch.manual_seed(2)
    w = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    a = torch.randn(75, 75, dtype=torch.float64)
    cov = a @ a.T
    got = filters.activation_patterns(w, cov)
    assert got.shape == w.shape and got.dtype == w.dtype
    for i in range(6):  # C @ w, one filter at a time
        torch.testing.assert_close(got[i].flatten(), cov @ w[i].flatten(), rtol=1e-12, atol=1e-10)
    d = torch.rand(75, dtype=torch.float64) + 0.5  # diagonal C: each weight scaled by its own variance
    assert torch.equal(filters.activation_patterns(w, torch.diag(d)), w * d.view(1, 3, 5, 5))
    assert filters.activation_patterns(w.float(), cov).dtype == torch.float32
    with pytest.raises(ValueError, match="does not match"):
        filters.activation_patterns(w, cov[:27, :27])


def test_patterns_of_whitened_filters_are_smooth_where_the_filters_are_not():
    """conv1 trained in whitened coordinates, W = U Z (Z the ZCA matrix of the data's patches): Z lifts
    the directions smooth images rarely vary in, so W looks like noise (even checkerboard-like); its
    patterns C W = U Z C undo that and are smooth. And Z C is what the eigenvalues say: with
    C = V diag(l) V^T, Z C = V diag(l / sqrt(l + eps mean(l))) V^T."""
    torch.manual_seed(3)
    noise = torch.rand(256, 3, 40, 40)
    blurred = F.avg_pool2d(noise.reshape(-1, 1, 40, 40), 7, stride=1).reshape(256, 3, 34, 34)
    images = ((blurred - 0.5) * 4 + 0.5).clamp(0, 1)  # smooth images: variance mostly at low frequencies
    trunk = build_trunk("cifar", conv1_kernel=5).eval()
    zca = whitening.conv1_patch_whitening(trunk, images, seed=0)
    u = torch.randn(32, 75)  # random in the whitened space: the start of a whitened run
    with torch.no_grad():
        trunk.conv1.weight.copy_((u @ zca).view(32, 3, 5, 5))
    filter_bank = filters.conv1_filters(trunk)
    covariance = filters.patch_covariance(trunk, images)
    patterns = filters.activation_patterns(filter_bank, covariance)
    torch.testing.assert_close(patterns, filters.conv1_patterns(trunk, images))
    assert abs(filters.spatial_coherence(u.view(32, 3, 5, 5))) < 0.1  # U itself: no structure
    assert filters.spatial_coherence(filter_bank) < 0  # W = U Z: high frequencies lifted
    assert filters.spatial_coherence(patterns) > 0.6  # C W: smooth
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0)
    zc = vectors @ torch.diag(eigenvalues / (eigenvalues + 1e-2 * eigenvalues.mean()).sqrt()) @ vectors.T
    scale = filters.bn_scale(filters.conv1_bn(trunk)).view(-1, 1)
    torch.testing.assert_close(patterns.flatten(1).double(), scale.double() * u.double() @ zc, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the figure


def _signed_red_trunk(positive=24, seed=4):
    """A random trunk whose first `positive` filters have red weights summing above 0, the rest below."""
    torch.manual_seed(seed)
    w = torch.randn(32, 3, 3, 3)
    sign = torch.tensor([1.0] * positive + [-1.0] * (32 - positive)).view(32, 1, 1)
    w[:, 0] = w[:, 0].abs() * sign
    return _trunk_with_weight(w)


def test_figure_draws_each_networks_patterns_beside_its_filters():
    with_data = Network("with data", _signed_red_trunk(), pattern_images=_flat_colour_images(), pattern_data="flat")
    without = Network("without", _signed_red_trunk(seed=5))
    fig = filters.filters_figure([with_data, without])
    f = filters.conv1_filters(with_data.trunk)
    p = filters.conv1_patterns(with_data.trunk, with_data.pattern_images)
    g = filters.conv1_filters(without.trunk)
    assert [ax.get_title() for ax in fig.axes] == [
        f"with data: filters\nspatial coherence {filters.spatial_coherence(f):.2f}",
        f"activation patterns on flat\nspatial coherence {filters.spatial_coherence(p):.2f}",
        f"without: filters\nspatial coherence {filters.spatial_coherence(g):.2f}\n(no patterns: no data given)"]
    drawn = [ax.get_images()[0].get_array() for ax in fig.axes]
    assert np.array_equal(drawn[0], filters.filter_grid(f))
    assert np.array_equal(drawn[1], filters.filter_grid(p))  # the patterns, tiled as the filters
    assert np.array_equal(drawn[2], filters.filter_grid(g))
    assert filters.spatial_coherence(p) > 0.99  # flat data: flat patterns
    # flat red patterns: each cell pure red (red weights summing above 0) or cyan (below)
    cells = filters.normalise_filters(p)
    assert torch.equal(cells[:24, 0], torch.ones(24, 3, 3)) and torch.equal(cells[24:, 0], torch.zeros(8, 3, 3))
    # no network with pattern images: the figure as before, one panel per network
    plain = filters.filters_figure([without])
    assert [ax.get_title() for ax in plain.axes] == [f"without\nspatial coherence {filters.spatial_coherence(g):.2f}"]


def test_written_png_shows_the_patterns(tmp_path):
    """The PNG itself: the right panel (patterns of flat red data) is pure red and pure cyan cells, red
    for 24 of the 32 filters; the left panel (filters) is many colours."""
    from PIL import Image

    net = Network("n", _signed_red_trunk(positive=24), pattern_images=_flat_colour_images())
    out = filters.write_filters([net], tmp_path / "f.png", scale=8)
    assert is_drawn_figure(out)
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    half = png.shape[1] // 2
    red = (png == [255, 0, 0]).all(2)
    cyan = (png == [0, 255, 255]).all(2)
    assert red[:, :half].sum() + cyan[:, :half].sum() < 0.05 * (red.sum() + cyan.sum())  # the filters are not
    share = red[:, half:].sum() / (red[:, half:].sum() + cyan[:, half:].sum())
    assert abs(share - 24 / 32) < 0.03, share
    saturated = png[:, half:][png[:, half:].max(2) - png[:, half:].min(2) > 40]
    assert len(saturated) > 5000 and (red[:, half:].sum() + cyan[:, half:].sum()) > 0.97 * len(saturated)
    left = png[:, :half][png[:, :half].max(2) - png[:, :half].min(2) > 40]
    assert len({tuple(c) for c in left}) > 20  # the filters: random colours


# ---------------------------------------------------------------------------- the data


def test_training_images_are_what_the_run_whitened_conv1_with(tiny_run, cifar_subset_dir, tmp_path):
    """Rebuilt from config.json, the first 4096 samples give the run's own ZCA matrix (saved in last.pt)
    exactly: a patch-stream run and a dataset run."""
    data_run = tmp_path / "data-run"
    spec = f"cifar10:{cifar_subset_dir}"
    assert main(["pretrain", "--method", "rotnet", "--data", spec, "--steps", "2", "--batch-size", "8", "--seed", "5",
                 "--out", str(data_run), "--quiet"]) == 0
    for run, seed in ((tiny_run, 0), (data_run, 5)):
        state = torch.load(run / "last.pt", map_location="cpu", weights_only=False)["training"]["model"]
        zca = state["trunk.stages.conv1.0.parametrizations.weight.0.zca"]
        images = networks.training_images(run)
        assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
        assert torch.equal(whitening.conv1_patch_whitening(build_trunk("cifar"), images, seed=seed), zca)
        assert torch.equal(networks.training_images(run / "trunk.pt", 10), images[:10])  # a file in the run
    # the dataset run: its 500 training images in the seed-5 epoch-0 shuffle; data_images makes the same
    images = networks.training_images(data_run, 100)
    with np.load(cifar_subset_dir / "cifar10_train.npz") as d:
        x = torch.from_numpy(d["x"]).permute(0, 3, 1, 2)
    assert torch.equal(images, x[permutation(500, 5, 0)[:100]].float() / 255)
    assert torch.equal(networks.data_images(spec, 100, seed=5), images)
    # the patch-stream run: the stream's first patches; data_images of its image makes the same
    assert torch.equal(networks.data_images("builtin:astronaut", 16), networks.training_images(tiny_run, 16))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "trunk.pt", bare / "trunk.pt")
    with pytest.raises(UserError, match="no config.json"):
        networks.training_images(bare / "trunk.pt")
    assert not networks.records_training_data({"method": "rotnet", "seed": 0})


# ---------------------------------------------------------------------------- the command


def _coherences(line):
    """(filters, patterns) coherences printed on one network's line."""
    numbers = [float(part.split()[0].rstrip(";")) for part in line.split("spatial coherence ")[1:]]
    assert len(numbers) == 2, line
    return numbers


def test_filters_cli_prints_both_coherences(tiny_run, tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["filters", "--random", str(tiny_run), "--patterns", "--pattern-data", "builtin:astronaut",
                 "--pattern-samples", "512", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("random (seed 0): 32 filters 3x3, spatial coherence ")
    assert "activation patterns on builtin:astronaut (512 images)" in lines[0]
    assert lines[1].startswith("rotnet, astronaut, all: 32 filters 3x3")
    assert "activation patterns on training data (512 images)" in lines[1]
    trained, _ = load_trunk(tiny_run)
    torch.manual_seed(0)
    random = build_trunk("cifar").eval()  # random:0
    for line, trunk, images in ((lines[0], random, networks.data_images("builtin:astronaut", 512)),
                                (lines[1], trained.eval(), networks.training_images(tiny_run, 512))):
        expected = [filters.spatial_coherence(filters.conv1_filters(trunk)),
                    filters.spatial_coherence(filters.conv1_patterns(trunk, images))]
        assert _coherences(line) == [round(v, 3) for v in expected]
    # whitened conv1 after 3 steps: filters like noise, patterns smooth
    filter_coherence, pattern_coherence = _coherences(lines[1])
    assert filter_coherence < 0.2 and pattern_coherence > 0.5
    assert is_drawn_figure(out)
    # --pattern-data-for-all: the run's patterns on the given data, too
    assert main(["filters", str(tiny_run), "--pattern-data", "builtin:coffee", "--pattern-data-for-all",
                 "--pattern-samples", "64", "--out", str(tmp_path / "g.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert "activation patterns on builtin:coffee (64 images)" in line
    assert _coherences(line)[1] == round(filters.spatial_coherence(
        filters.conv1_patterns(trained, networks.data_images("builtin:coffee", 64))), 3)


def test_filters_cli_pattern_errors_are_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_run / "trunk.pt", bare / "trunk.pt")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for argv, message in [
        ([str(bare / "trunk.pt"), "--patterns"], "no recorded training data"),
        (["random", "--patterns"], "give --pattern-data"),
        (["random", "--pattern-data", "no/such/image.png"], "--pattern-data no/such/image.png: "),
        ([str(tiny_run), "--patterns", "--pattern-data-for-all"], "--pattern-data-for-all needs --pattern-data"),
    ]:
        assert main(["filters", *argv, "--out", "x.png"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("monossl: error: ") and err.count("\n") == 1 and message in err, err
    assert not list(work.iterdir())  # nothing written
    # the bare trunk with data given: drawn on that data
    assert main(["filters", str(bare / "trunk.pt"), "--pattern-data", "builtin:astronaut", "--pattern-samples", "64",
                 "--out", "x.png"]) == 0
    assert "activation patterns on builtin:astronaut (64 images)" in capsys.readouterr().out
