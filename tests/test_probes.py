"""Linear probes: pooled sizes per preset, ten-crop averaging, separable toy data, cached vs
streamed features, the augmentation path on folders, and `monossl probe` end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from PIL import Image

from monossl.cli import main
from monossl.data.datasets import load_pair
from monossl.data.image_sets import TensorImages
from monossl.eval.features import pooled_features, pooled_shapes
from monossl.eval.linear_probes import LinearProbes, average_crop_logits
from monossl.eval.probe import probe
from monossl.eval.protocols import PROTOCOLS, Pool, ProbeProtocol, get_protocol
from monossl.eval.protocols import test_transform as make_test_transform  # (not a test)
from monossl.eval.results import EpochRecord, ProbeResult, TapResult, results_markdown
from monossl.models import build_trunk, save_trunk


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a busy machine
    (two spinning OpenMP threads on two shared cores slow small ops down ~8x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sizes(trunk, name):
    return {k: v["pooled_size"] for k, v in pooled_shapes(trunk, get_protocol(name)).items()}


def test_pooled_sizes_cifar():
    torch.manual_seed(0)
    trunk = build_trunk("cifar")  # 32-64-128-256 channels: pooled to 12/8/6/4 positions a side
    assert sizes(trunk, "cifar") == {"conv1": 4608, "conv2": 4096, "conv3": 4608, "conv4": 4096}
    feats = pooled_features(trunk.eval(), torch.rand(2, 3, 32, 32), get_protocol("cifar").pools)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "conv1": (2, 4608), "conv2": (2, 4096), "conv3": (2, 4608), "conv4": (2, 4096)}
    wide = build_trunk("cifar", widths=(64, 128, 256, 512))  # the same rule: 8/6/4/3
    assert sizes(wide, "cifar") == {"conv1": 4096, "conv2": 4608, "conv3": 4096, "conv4": 4608}


def test_pooled_sizes_alexnet():
    torch.manual_seed(0)
    big = build_trunk("alexnet-big")
    assert list(sizes(big, "asano-max").values()) == [9600, 9216, 9600, 9600, 9216]
    assert list(sizes(big, "zhang-avg").values()) == [9600, 9216, 9600, 9600, 9216]
    assert list(sizes(big, "rotnet-adaptive").values()) == [96 * 144, 256 * 49, 384 * 25, 384 * 36, 256 * 36]
    small = build_trunk("alexnet-small")  # RotNet's own AlexNet: its pooling gives ~9k everywhere
    assert list(sizes(small, "rotnet-adaptive").values()) == [9216, 9408, 9600, 9216, 9216]


def test_pool_kinds():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(Pool("max", kernel=2, stride=2)(x), torch.nn.functional.max_pool2d(x, 2))
    assert Pool("adaptive-avg", 3)(x).shape == (2, 3, 3, 3)
    assert Pool("none")(x) is x


def test_ten_crop_transform_and_averaging():
    img = Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy())
    proto = get_protocol("asano-max")
    crops = make_test_transform(proto)(img)
    assert crops.shape == (10, 3, 224, 224) and crops.dtype == torch.float32
    # the same ten crops as torchvision's TenCrop of the resized image (4 corners, centre, then flipped)
    from torchvision.transforms import v2

    F = v2.functional
    resized = F.to_dtype(F.resize(F.to_image(img), 256), torch.float32, scale=True)
    assert resized.shape == (3, 295, 256)  # shorter side to 256
    ref = F.ten_crop(resized, 224)
    assert all(torch.allclose(crops[i], ref[i], atol=1e-6) for i in range(10))
    assert torch.allclose(crops[9], F.center_crop(resized, 224).flip(-1), atol=1e-6)

    torch.manual_seed(0)
    model = torch.nn.Linear(12, 5)
    x = torch.randn(4, 10, 12)  # 4 images, 10 crops each
    logits = model(x.flatten(0, 1))
    avg = average_crop_logits(logits, 10)
    expected = torch.stack([torch.stack([model(x[b, c]) for c in range(10)]).mean(0) for b in range(4)])
    assert avg.shape == (4, 5) and torch.allclose(avg, expected, atol=1e-6)
    assert average_crop_logits(logits, 1) is logits


def colour_dataset(n, seed):
    """4 classes, each a solid colour with noise: linearly separable from any tap."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[220, 30, 30], [30, 200, 40], [30, 40, 220], [200, 200, 40]])
    y = torch.arange(n) % 4
    x = colours[y][:, :, None, None] + torch.randint(-30, 31, (n, 3, 32, 32), generator=g)
    return TensorImages(x.clamp(0, 255).to(torch.uint8), y, ["red", "green", "blue", "yellow"], "colours")


def test_separable_toy_reaches_100():
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    proto = get_protocol("cifar").with_overrides(epochs=4, batch_size=32)
    result = probe(trunk, colour_dataset(128, 1), colour_dataset(64, 2), proto, device="cpu", seed=0,
                   progress=False, verbose=False)
    for tap, r in result["taps"].items():
        assert r["top1"] >= 98.0, (tap, r)
        assert r["top5"] == 100.0  # 4 classes: top-5 is top-4
    # the dict holds exactly what ProbeResult describes (results.json)
    assert set(result) == ProbeResult.__required_keys__
    assert all(set(r) == TapResult.__required_keys__ for r in result["taps"].values())
    assert [set(h) for h in result["history"]] == [EpochRecord.__required_keys__ | EpochRecord.__optional_keys__] * 4


def test_cache_equals_streaming():
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    train, test = colour_dataset(96, 3), colour_dataset(40, 4)
    for bn_stats in ("dataset", "batch"):
        proto = dataclasses.replace(get_protocol("cifar").with_overrides(epochs=2, batch_size=32), bn_stats=bn_stats)
        kw = dict(device="cpu", seed=5, progress=False, verbose=False, return_probes=True)
        cached, p1 = probe(trunk, train, test, proto, cache=True, **kw)
        streamed, p2 = probe(trunk, train, test, proto, cache=False, **kw)
        assert cached["cached_features"] and not streamed["cached_features"]
        for k in cached["taps"]:
            w1, w2 = p1.heads[k][1].weight, p2.heads[k][1].weight
            assert torch.allclose(w1, w2, rtol=1e-2, atol=2e-4), (bn_stats, k, (w1 - w2).abs().max())
            assert abs(cached["taps"][k]["top1"] - streamed["taps"][k]["top1"]) <= 2.5
            bn1, bn2 = p1.heads[k][0], p2.heads[k][0]
            assert torch.allclose(bn1.running_mean, bn2.running_mean, rtol=1e-3, atol=1e-3)
    # the same seed gives the same probes
    again, p3 = probe(trunk, train, test, proto, cache=True, **kw)
    assert again["taps"] == cached["taps"]
    assert all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p3.state_dict().values()))


def test_augmentation_path_on_folder(tiny_imagefolder):
    """The streamed path with random-resized crops and ten test crops, on a tiny ImageFolder."""
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    proto = ProbeProtocol(name="tiny-aug", archs=("cifar",), pools=get_protocol("cifar").pools, epochs=2, lr=0.01,
                          milestones=(1,), batch_size=4, train_aug="rrc-flip", input_size=32, test_resize=36,
                          test_crops=10)
    train, val = load_pair(f"folder:{tiny_imagefolder}")
    result = probe(trunk, train, val, proto, device="cpu", seed=0, progress=False, verbose=False, workers=0)
    assert not result["cached_features"]
    assert result["protocol"]["test_crops"] == 10
    for r in result["taps"].values():
        assert 0.0 <= r["top1"] <= 100.0 and r["top5"] == 100.0


def test_with_overrides_scales_milestones():
    p = get_protocol("asano-max").with_overrides(epochs=12, lr=0.1)
    assert p.milestones == (3, 7, 10) and p.lr == 0.1 and p.epochs == 12
    assert get_protocol("cifar").with_overrides(epochs=2).milestones == (1,)
    assert PROTOCOLS["asano-max"].epochs == 36  # presets untouched


def test_probes_fixed_stats_equal_standardisation():
    probes = LinearProbes({"a": 6}, 3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(10, 6) * 3 + 1
    probes.set_stats({"a": (x.mean(0), x.var(0, unbiased=False))})
    probes.train()
    assert not probes.heads["a"][0].training
    z = (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()
    assert torch.allclose(probes({"a": x})["a"], probes({"a": z}, standardized=True)["a"], atol=1e-5)


def test_cli_end_to_end(cifar_subset_dir, tmp_path, capsys):
    out = tmp_path / "probe-random"
    rc = main(["probe", "--random", "--arch", "cifar", "--data", f"cifar10:{cifar_subset_dir}", "--epochs", "2",
               "--batch-size", "64", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "conv2: 64x16x16 -> adaptive-avg to >= 4096 values -> 64x8x8 = 4096 values" in captured.out
    result = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert "| tap | pooled size | top-1 (final) | top-5 (final) | best top-1 (extra) | best epoch |" in md
    assert result["protocol"]["name"] == "cifar" and result["protocol"]["epochs"] == 2
    assert result["trunk"]["arch"] == "cifar" and result["trunk"]["meta"]["method"] == "random"
    assert result["n_train"] == 500 and result["n_test"] == 200 and result["seed"] == 0
    assert "environment" in result and "total_s" in result["timings"]
    tops = [r["top1"] for r in result["taps"].values()]
    assert list(result["taps"]) == ["conv1", "conv2", "conv3", "conv4"]
    for r in result["taps"].values():
        assert 0 <= r["top1"] <= 100 and 0 <= r["top5"] <= 100 and r["top1"] <= r["top5"]
        assert r["best_top1"] >= r["top1"] and 1 <= r["best_epoch"] <= 2
    if (cifar_subset_dir / "REAL").exists():
        assert sum(tops) / len(tops) > 20.0, tops  # chance is 10%
    else:
        assert min(tops) > 30.0, tops


def test_cli_probe_run_dir_and_arch_mismatch(cifar_subset_dir, tmp_path, capsys):
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    save_trunk(run / "trunk.pt", build_trunk("cifar"), {"method": "test"})
    rc = main(["probe", str(run), "--protocol", "asano-max", "--data", f"cifar10:{cifar_subset_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "cifar trunk, but protocol asano-max is for alexnet-big/alexnet-small" in err[0]
    rc = main(["probe", str(run), "--arch", "alexnet-big", "--data", f"cifar10:{cifar_subset_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds a cifar trunk" in err[0]
    # a run directory probes into RUN/probe-<protocol>
    rc = main(["probe", str(run), "--data", f"cifar10:{cifar_subset_dir}", "--epochs", "1", "--subset", "100",
               "--test-subset", "50", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads((run / "probe-cifar" / "results.json").read_text())
    assert result["n_train"] == 100 and result["trunk"]["meta"]["method"] == "test"


@pytest.mark.parametrize("argv, message", [
    (["probe"], "give a RUN_DIR"),
    (["probe", "--random"], "--random needs --out"),
    (["probe", "x", "--random", "--out", "o"], "not both"),
    (["probe", "--random", "--out", "o", "--protocol", "nope"], "invalid choice"),
    (["probe", "--random", "--out", "o", "--knn-values", "1024"], "--knn-values needs --knn"),
    (["probe", "--random", "--out", "o", "--knn", "20,x"], "--knn wants neighbour counts"),
])
def test_cli_usage_errors(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_knn_is_exact_on_a_separable_toy_set_and_weighted_votes_decide():
    from monossl.eval.knn import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 10  # four well separated directions
    train_labels = torch.arange(40) % 4
    train = centres[train_labels] + 0.1 * torch.randn(40, 4, generator=g)
    test_labels = torch.arange(12) % 4
    test = centres[test_labels] + 0.1 * torch.randn(12, 4, generator=g)
    assert knn_accuracy(train, train_labels, test, test_labels, ks=(1, 5, 20)) == {"k1": 100.0, "k5": 100.0,
                                                                                  "k20": 100.0}
    # one very close neighbour of class 1 outvotes two farther ones of class 0: the votes are weighted
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    query = torch.tensor([[1.0, 0.01]])
    top = knn_accuracy(bank, torch.tensor([1, 0, 0]), query, torch.tensor([1]), ks=(3,), num_classes=2)
    assert top == {"k3": 100.0}
    assert knn_accuracy(bank, torch.tensor([1, 0, 0]), query, torch.tensor([1]), ks=(3,), num_classes=2,
                        temperature=100.0) == {"k3": 0.0}  # near-uniform weights: the majority wins


def test_probe_reports_knn_per_tap_from_the_cached_features(cifar_subset_dir):
    import torch.nn.functional as F

    from monossl.eval.features import probe_matmul_dtype
    from monossl.eval.knn import knn_accuracy

    train, test = load_pair(f"cifar10:{cifar_subset_dir}")
    trunk = build_trunk("cifar", widths=[8, 8, 16, 16])
    proto = get_protocol("cifar").with_overrides(epochs=1)
    with_knn = probe(trunk, train, test, proto, device="cpu", knn=(5, 20), progress=False, verbose=False)
    plain = probe(trunk, train, test, proto, device="cpu", progress=False, verbose=False)
    assert with_knn["taps"] == plain["taps"]  # k-NN does not change the linear probes
    assert "k-NN" in results_markdown(with_knn) and "knn" not in plain

    # the same numbers from features computed here, unstandardised, and from a 2x2-coarser grid
    coarse = probe(trunk, train, test, proto, device="cpu", knn=(5, 20), knn_values=60, progress=False,
                   verbose=False)
    with torch.no_grad():
        feats = [pooled_features(trunk.eval(), d.images.float() / 255, proto.pools) for d in (train, test)]
    dtype = probe_matmul_dtype(torch.device("cpu"))  # what the probe's k-NN multiplies in
    for tap, info in pooled_shapes(trunk, proto).items():
        shape = tuple(info["pooled_shape"])
        a, b = (f[tap].half() for f in feats)
        assert with_knn["knn_dims"][tap] == a.shape[1] == math.prod(shape)
        assert with_knn["knn"][tap] == knn_accuracy(a, train.labels, b, test.labels, ks=(5, 20), dtype=dtype)
        side = math.ceil(math.sqrt(60 / shape[0]))  # the smallest side giving >= 60 values
        a2, b2 = (F.adaptive_avg_pool2d(x.float().view(-1, *shape), side).flatten(1).half() for x in (a, b))
        assert coarse["knn_dims"][tap] == shape[0] * side * side < a.shape[1]
        assert coarse["knn"][tap] == knn_accuracy(a2, train.labels, b2, test.labels, ks=(5, 20), dtype=dtype)
    assert coarse["knn"] != with_knn["knn"]


@pytest.mark.parametrize("arch", ["cifar", "alexnet-small", "resnet18-cifar"])
def test_batchnorm_fused_into_convs_gives_the_same_taps(arch):
    from monossl.models import fuse_batchnorm, random_trunk

    trunk = random_trunk(arch, 0)
    with torch.no_grad():  # BatchNorm statistics and affine parameters far from identity
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    trunk.eval()
    x = torch.rand(2, 3, trunk.input_size, trunk.input_size)
    expected = trunk.taps(x)
    fused = fuse_batchnorm(copy.deepcopy(trunk))
    got = fused.taps(x)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-5) for k in expected)
    kinds = {type(m) for m in fused.stages.modules()}
    if arch != "resnet18-cifar":  # a ResNet's blocks keep theirs (conv and BatchNorm are not in a Sequential)
        assert torch.nn.BatchNorm2d not in kinds
    assert fused.conv1.bias is not None  # conv1 found where it was, now with BatchNorm's shift
    with pytest.raises(ValueError, match="eval mode"):
        fuse_batchnorm(build_trunk(arch))
