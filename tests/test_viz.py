"""conv1 filters, style transfer, plots and the report (monossl.viz)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monossl.cli import main
from monossl.errors import UserError
from monossl.models import build_trunk, load_trunk
from monossl.paper import CIFAR10_BIGAN
from monossl.viz import filters, networks, plots, report, style


def _randomise_bn(trunk, seed=0):
    """Give every BatchNorm non-trivial gamma, beta and running statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) * 2 - 0.5  # some negative gammas too
            m.bias.data = torch.randn(n, generator=g)
            m.running_mean = torch.randn(n, generator=g)
            m.running_var = torch.rand(n, generator=g) * 3 + 0.1
    return trunk.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- filters


def test_filter_grid_size_and_normalisation():
    f = torch.randn(10, 3, 5, 5)
    grid = filters.filter_grid(f, scale=3, pad=1)
    assert grid.shape == (3 * 15 + 4, 4 * 15 + 5, 3)  # ceil(sqrt(10)) = 4 columns, 3 rows, 1-px gaps
    assert grid.min() >= 0 and grid.max() <= 1
    assert (grid[0] == 1).all() and (grid[:, 0] == 1).all() and (grid[16] == 1).all()  # white gaps
    # each cell holds its filter, min-max normalised on its own and enlarged 3x (nearest)
    for row, col in [(0, 0), (0, 2), (1, 1), (2, 1)]:
        k = 4 * row + col
        cell = torch.from_numpy(grid[1 + row * 16:1 + row * 16 + 15, 1 + col * 16:1 + col * 16 + 15].copy())
        lo, hi = f[k].min(), f[k].max()
        expected = ((f[k] - lo) / (hi - lo)).repeat_interleave(3, 1).repeat_interleave(3, 2).permute(1, 2, 0)
        torch.testing.assert_close(cell, expected)
    assert (grid[1 + 2 * 16:, 1 + 2 * 16:] == 1).all()  # the last row's cells after filter 9 stay empty
    flat = filters.filter_grid(f, scale=1, pad=0, ncols=10)
    assert flat.shape == (5, 50, 3)
    torch.testing.assert_close(torch.from_numpy(flat[:, 45:50].copy()),
                               filters.normalise_filters(f)[9].permute(1, 2, 0))


def test_filters_figure_labels_from_meta(tiny_run):
    trunk, meta = load_trunk(tiny_run)
    assert networks.run_label(meta) == "rotnet, astronaut, all"
    assert networks.run_label({"method": "supervised", "data": "cifar10"}) == "supervised, cifar10"
    nets = networks.networks([tiny_run], random=True, seed=3)
    assert [n.label for n in nets] == ["random (seed 3)", "rotnet, astronaut, all"]
    torch.manual_seed(3)
    assert torch.equal(nets[0].trunk.conv1.weight, build_trunk("cifar").conv1.weight)
    assert torch.equal(nets[1].trunk.conv1.weight, trunk.conv1.weight)
    fig = filters.filters_figure(nets)
    coherence = [filters.spatial_coherence(filters.conv1_filters(n.trunk)) for n in nets]
    assert [ax.get_title() for ax in fig.axes] == [f"random (seed 3)\nspatial coherence {coherence[0]:.2f}",
                                                   f"rotnet, astronaut, all\nspatial coherence {coherence[1]:.2f}"]
    for ax, n in zip(fig.axes, nets):  # each panel shows its network's conv1 grid
        assert np.array_equal(ax.get_images()[0].get_array(), filters.filter_grid(filters.conv1_filters(n.trunk)))


def test_bn_folding_reproduces_conv1_bn_up_to_the_shift():
    torch.manual_seed(0)
    trunk = _randomise_bn(build_trunk("cifar"))
    conv, bn = trunk.stages["conv1"][0], trunk.stages["conv1"][1]
    x = trunk._input(torch.rand(2, 3, 20, 20))
    with torch.no_grad():
        reference = bn(conv(x))  # BN(conv(x, W)) = scale * conv(x, W) + beta - running_mean * scale
        folded = F.conv2d(x, filters.conv1_filters(trunk), padding=conv.padding)  # conv(x, W * scale)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
    torch.testing.assert_close(folded, reference - shift, atol=1e-4, rtol=1e-4)
    # and without folding it is the raw weight
    torch.testing.assert_close(filters.conv1_filters(trunk, fold_bn=False), conv.weight.detach())


def test_sobel_effective_filter_reproduces_sobel_then_conv1():
    torch.manual_seed(1)
    trunk = _randomise_bn(build_trunk("cifar", sobel=True))
    conv, bn = trunk.stages["conv1"][0], trunk.stages["conv1"][1]
    eff = filters.conv1_filters(trunk)
    k = conv.kernel_size[0]
    assert eff.shape == (conv.out_channels, 3, k + 2, k + 2)
    x = (torch.rand(2, 3, 24, 24) - trunk.mean) / trunk.std  # what the Sobel front-end sees
    with torch.no_grad():
        real = bn(conv(trunk.sobel(x)))
        mine = F.conv2d(x, eff, padding=(k + 2) // 2)
    shift = filters.bn_shift(bn).view(1, -1, 1, 1)
    c = k // 2  # zero padding of the intermediate gradients differs within k//2 of the border
    torch.testing.assert_close(mine[..., c:-c, c:-c], (real - shift)[..., c:-c, c:-c], atol=1e-4, rtol=1e-4)
    # grey: every filter's R, G, B kernels are proportional to the greyscale weights, drawn in grey
    grey = trunk.sobel.grey.view(3)
    torch.testing.assert_close(eff[:, 1] * grey[0], eff[:, 0] * grey[1])
    grid = filters.filter_grid(eff, grey=True)
    assert (grid[..., 0] == grid[..., 1]).all()


def test_filters_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "f.png"
    assert main(["filters", "--random", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random (seed 0): 32 filters 3x3" in printed and "rotnet, astronaut, all: 32 filters 3x3" in printed
    from PIL import Image

    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert png.shape[1] > png.shape[0]  # two panels side by side
    # the filters are drawn in colour (titles alone would be grey): many coloured pixels, in both halves
    coloured = png.max(2) - png.min(2) > 40
    half = png.shape[1] // 2
    assert coloured[:, :half].sum() > 2000 and coloured[:, half:].sum() > 2000


# ---------------------------------------------------------------------------- style


def test_style_loss_decreases():
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    r = style.stylize(trunk, "builtin:astronaut", "builtin:coffee", size=32, steps=10, log=lambda *_: None)
    s0, s1 = r["style_loss"]
    assert s1 < 0.5 * s0, r["style_loss"]
    assert r["image"].shape == (3, 32, 32)
    assert 0 <= r["image"].min() and r["image"].max() <= 1
    assert r["content_loss"][0] == 0  # starts from the content image
    # the caller's trunk is untouched (stylize works on a frozen eval copy with average pools)
    assert trunk.training and all(p.requires_grad for p in trunk.parameters())
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in trunk.modules()) == 3


def test_gram_and_taps():
    f = torch.randn(1, 4, 3, 5)
    g = style.gram(f)
    torch.testing.assert_close(g[0], f[0].reshape(4, 15) @ f[0].reshape(4, 15).T / 60)
    trunk = build_trunk("cifar")
    assert style.default_taps(trunk) == (["conv1", "conv2", "conv3", "conv4"], "conv3")
    with pytest.raises(UserError, match="unknown tap"):
        style.stylize(trunk, torch.rand(3, 16, 16), torch.rand(3, 16, 16), size=16, steps=1, content_tap="conv9",
                      log=lambda *_: None)


def test_stylize_compare_cli(tiny_run, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert main(["stylize", "--content", "builtin:astronaut", "--style", "builtin:coffee", "--random",
                 "--compare", str(tiny_run), "--size", "16", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("style loss at start") == 2 and text.count("style loss at end") == 2
    assert text.index("[random (seed 0)]") < text.index("[rotnet, astronaut, all]")
    from PIL import Image

    figure = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert figure.shape[1] > 3 * figure.shape[0]  # four panels in a row: content, style, two networks
    assert (figure.max(2) - figure.min(2) > 40).sum() > 5000  # the images, in colour
    single = tmp_path / "one.png"
    assert main(["stylize", "--run", str(tiny_run), "--size", "16", "--steps", "1", "--out", str(single)]) == 0
    written = np.asarray(Image.open(single).convert("RGB"))
    assert written.shape == (16, 16, 3)
    # the PNG holds the stylised image (8-bit), which is not the content image
    r = style.stylize(networks.load_network(tiny_run).trunk, "builtin:astronaut", "builtin:coffee", size=16, steps=1,
                      log=lambda *_: None)
    assert np.array_equal(written, (r["image"].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
    assert not torch.equal(r["image"], r["content"])


# ---------------------------------------------------------------------------- plots, report


def test_layer_bars_black_and_white():
    table = {"random": {"conv1": 50.0, "conv2": 40.0}, "rotnet": {"conv1": 55.5, "conv2": 52.0}}
    fig = plots.layer_bars_figure(table, paper={"random": {"conv1": 57.8, "conv2": 55.5}})
    ax = fig.axes[0]
    hatches = {p.get_hatch() for p in ax.patches}
    assert len(hatches) == 2  # rows differ by hatch, not by colour alone
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["random", "one image (RotNet)", "paper"]


def test_contact_sheet_from_run_config(tiny_run, tmp_path):
    config = plots.read_run_config(tiny_run)
    patches = plots.patches_from_config(config, n=6)
    assert patches.shape == (6, 3, 32, 32)
    sheet = plots.contact_sheet_figure(patches, ncols=3).axes[0].get_images()[0].get_array()
    assert sheet.shape == (2 * 32 + 3, 3 * 32 + 4, 3)
    for i in range(6):  # patch i in row i // 3, column i % 3, with 1-px white gaps
        y, x = 1 + (i // 3) * 33, 1 + (i % 3) * 33
        assert np.array_equal(sheet[y:y + 32, x:x + 32], patches[i].permute(1, 2, 0).numpy())
    assert (sheet[0] == 1).all() and (sheet[33] == 1).all()
    out = plots.write_contact_sheet(tiny_run, tmp_path / "p.png", n=6)
    from PIL import Image

    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (png.min(2) < 230).mean() > 0.4  # mostly patches, not white space


def _md_tables(text):
    """Markdown tables of a page: list of (header, rows of cells)."""
    tables, cur = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cur is None:
                cur = (cells, [])
            elif not set("".join(cells)) <= {"-"}:
                cur[1].append(cells)
        elif cur is not None:
            tables.append(cur)
            cur = None
    if cur is not None:
        tables.append(cur)
    return tables


def test_report_numbers_equal_the_results_files(tiny_run, tmp_path):
    compare = tmp_path / "compare"
    compare.mkdir()
    table = {"random": {"conv1": 30.0, "conv2": 22.33, "conv3": 13.333333333333334, "conv4": 19.3},
             "rotnet": {"conv1": 29.67, "conv2": 30.01, "conv3": 30.5, "conv4": 33.33},
             "supervised": {"conv1": 61.25, "conv2": 70.0, "conv3": 72.125, "conv4": 0.1}}
    rows = {r: {"trunk": {"arch": "cifar", "meta": {"method": "rotnet" if r == "rotnet" else r}}} for r in table}
    (compare / "results.json").write_text(json.dumps({"config": {"data": "cifar10", "seed": 4}, "table": table,
                                                      "rows": rows}))
    probe = tmp_path / "probe" / "results.json"
    probe.parent.mkdir()
    probe.write_text(json.dumps({"dataset": "cifar10", "protocol": {"name": "cifar"},
                                 "trunk": {"arch": "cifar", "meta": {"method": "bigan", "image": ["builtin:coffee"],
                                                                     "preset": "rotation+scale"}},
                                 "taps": {t: {"top1": v, "top5": 90.0} for t, v in
                                          {"conv1": 44.44, "conv2": 55.55, "conv3": 66.0, "conv4": 7.125}.items()}}))
    out = tmp_path / "report"
    assert main(["report", str(compare), str(probe), str(tiny_run), "--out", str(out), "--patches", "9"]) == 0
    md = (out / "report.md").read_text()
    tables = _md_tables(md)
    ours, probes = tables[0], tables[1]

    def check(parsed, expected, paper_rows):
        header, body = parsed
        assert len(body) == len(expected)
        for (row, cells), line in zip(expected.items(), body):
            for tap, value in cells.items():
                assert float(line[header.index(tap)]) == value, (row, tap)
                prow = paper_rows.get(row)
                if prow:
                    assert float(line[header.index(f"{tap} (paper)")]) == CIFAR10_BIGAN[prow][tap]
                elif f"{tap} (paper)" in header:
                    assert line[header.index(f"{tap} (paper)")] == ""

    check(ours, table, {"random": "Random features", "supervised": "Fully supervised"})
    probe_taps = json.loads(probe.read_text())["taps"]
    probe_cells = {"bigan, coffee, rotation+scale": {t: v["top1"] for t, v in probe_taps.items()}}
    check(probes, probe_cells, {"bigan, coffee, rotation+scale": "Rot. & scale"})
    assert probes[1][0][0].startswith("bigan, coffee, rotation+scale")
    # the paper's table is reproduced as in PAPER.md
    paper_header, paper_body = tables[2]
    assert {r[0]: [float(v) for v in r[1:]] for r in paper_body} == {
        k: [v[t] for t in ("conv1", "conv2", "conv3", "conv4")] for k, v in CIFAR10_BIGAN.items()}
    # the figures exist and the HTML is self-contained with the same numbers
    for name in ("bars-1.png", "bars-2.png", "filters.png", "patches.png"):
        assert (out / name).is_file() and f"({name})" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    for name in ("bars-1.png", "bars-2.png", "filters.png", "patches.png"):  # each figure embedded as written
        assert "data:image/png;base64," + base64.b64encode((out / name).read_bytes()).decode("ascii") in page
    assert not re.search(r'src="(?!data:)', page)
    for cells in table.values():
        for v in cells.values():
            assert f"<td>{v!r}</td>" in page


def test_report_reads_a_compare_directory_with_its_runs(tiny_run, tmp_path):
    import shutil

    compare = tmp_path / "cmp"
    shutil.copytree(tiny_run, compare / "rotnet")
    (compare / "results.json").write_text(json.dumps({"config": {"seed": 2},
                                                      "table": {"random": {"conv1": 1.5}, "rotnet": {"conv1": 2.5}}}))
    got = report.gather([str(compare)])
    assert got.runs == ["random:2", str(compare / "rotnet")]
    assert got.patch_runs == [compare / "rotnet"]
    assert len(got.tables) == 1 and got.tables[0].ours == {"random": {"conv1": 1.5}, "rotnet": {"conv1": 2.5}}


@pytest.mark.parametrize("argv", [
    ["filters", "no/such/run", "--out", "x.png"],
    ["stylize", "--run", "no/such/run", "--out", "x.png"],
    ["stylize", "--compare", "random", "no/such/run", "--out", "x.png"],
    ["report", "no/such/run", "--out", "rep"],
    ["filters", "--random", "--out", "x.gif"],
])
def test_commands_give_one_line_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_spatial_coherence_random_near_zero_smooth_high():
    from monossl.viz.filters import spatial_coherence

    torch.manual_seed(0)
    random_bank = torch.randn(64, 3, 7, 7)
    assert abs(spatial_coherence(random_bank)) < 0.05
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 7), torch.linspace(-1, 1, 7), indexing="ij")
    blobs = [torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.5) for cx in (-0.3, 0.3) for cy in (-0.3, 0.3)]
    ramps = [torch.cos(a) * xx + torch.sin(a) * yy for a in torch.linspace(0, 3.0, 8)]
    smooth = torch.stack([f.expand(3, 7, 7) * torch.tensor([1.0, -0.5, 0.2]).view(3, 1, 1) for f in blobs + ramps])
    assert spatial_coherence(smooth) > 0.8
    checker = (-1.0) ** (xx.argsort(1).argsort(1) + yy.argsort(0).argsort(0)).float()
    assert spatial_coherence(checker.expand(4, 3, 7, 7)) < -0.9  # high frequency: negative


def test_paper_rows_are_matched_on_cifar10_only():
    from monossl.viz.report import paper_row_for

    assert paper_row_for("random", dataset="cifar10") == paper_row_for("random", dataset="cifar10:/data") \
        == "Random features"
    assert paper_row_for("random", dataset="cifar100") is None  # shares the prefix, not the paper's numbers
    assert paper_row_for("random", dataset="stl10:/data") is None
