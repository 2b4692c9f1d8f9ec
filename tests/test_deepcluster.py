"""DeepCluster: PCA whitening, k-means, NMI, the cluster-uniform sampler, the per-epoch head,
fixed samples across epochs, exact resume, collapse warnings and a tiny run through the CLI."""

import json

import numpy as np
import pytest
import torch

from monossl.data.batches import StreamSource, TensorSource
from monossl.methods.cluster_sampler import uniform_cluster_order
from monossl.methods.deepcluster import DeepCluster, DeepClusterConfig, default_clusters
from monossl.methods.kmeans import run_kmeans
from monossl.methods.nmi import nmi
from monossl.methods.pca import PCAWhitening
from monossl.models import build_trunk
from monossl.runs import read_jsonl
from monossl.train import LoopConfig, train

CPU = torch.device("cpu")


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _small_trunk(**kw):
    torch.manual_seed(0)
    return build_trunk("cifar", widths=(8, 8, 16, 16), **kw)


# -- PCA, k-means, NMI ------------------------------------------------------------------------

def test_pca_whitening_gives_identity_covariance_on_fitted_data():
    g = torch.Generator().manual_seed(0)
    rotation = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    mixing = torch.logspace(-1, 1, 64)[:, None] * rotation  # correlated, variances from 0.01 to 100
    x = torch.randn(4000, 64, generator=g) @ mixing + 5.0
    for dim, data in ((32, x), (64, x), (32, x.half())):  # reduced, full, and from fp16 features
        pca = PCAWhitening.fit(data, dim)
        y = pca.transform(data).double()
        assert y.shape == (4000, dim)
        assert torch.allclose(y.mean(0), torch.zeros(dim, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(torch.cov(y.T), torch.eye(dim, dtype=torch.float64), atol=1e-3)
    # the leading components are the directions of largest variance, in order
    assert torch.all(pca.eigenvalues[:-1] >= pca.eigenvalues[1:])


def test_pca_with_fewer_samples_than_dimensions_uses_the_gram_matrix():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 200, generator=g) @ torch.randn(200, 200, generator=g) + 3.0  # n = 50 < D = 200
    cov_evals = torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0)
    pca = PCAWhitening.fit(x, 32)
    assert torch.allclose(pca.eigenvalues, cov_evals[:32], rtol=1e-6)  # the covariance's top eigenvalues
    y = pca.transform(x).double()
    assert torch.allclose(torch.cov(y.T), torch.eye(32, dtype=torch.float64), atol=1e-4)
    # more components than the data's rank (49): the extra ones are zero, not noise
    y = PCAWhitening.fit(x, 64).transform(x).double()
    assert torch.allclose(torch.cov(y[:, :49].T), torch.eye(49, dtype=torch.float64), atol=1e-4)
    assert y[:, 49:].abs().max() < 1e-3


def test_pca_floor_keeps_null_directions_from_exploding():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(500, 32)
    x[:, :8] = torch.randn(500, 8, generator=g)  # 24 dead units
    y = PCAWhitening.fit(x, 16).transform(x)
    var = y.var(0)
    assert torch.allclose(var[:8], torch.ones(8), atol=1e-3)
    assert var[8:].max() < 1e-3  # not blown up into unit-variance noise


def test_kmeans_recovers_well_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 256, generator=g) * 10
    truth = torch.arange(8).repeat_interleave(100)
    x = centres[truth] + torch.randn(800, 256, generator=g)
    # k-means is a local method: a start may still merge two blobs and split another (NMI ~0.94),
    # so most (not all) seeds must recover the blobs exactly, and none may be far off
    scores = []
    for seed in range(5):
        labels, stats = run_kmeans(x, 8, seed=seed, niter=20)
        scores.append(nmi(labels, truth.numpy()))
        assert stats["clusters_nonempty"] == 8
        if scores[-1] > 0.99:
            assert stats["largest_cluster_frac"] == pytest.approx(1 / 8)
    assert sum(s > 0.99 for s in scores) >= 4 and min(scores) > 0.9


def test_nmi_values():
    assert nmi([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]) == pytest.approx(1.0)  # same partition, renamed
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    # by hand: I = 2/3 ln 2, H = ln 2 and ln 3 -> I / mean(H) = 0.51580 (scikit-learn's value)
    assert nmi([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.5158037429793889)
    assert nmi([1, 1, 1], [2, 2, 2]) == 1.0


def test_default_clusters_rule():
    assert default_clusters(1_281_167) == 10_000  # ImageNet: the paper's k
    assert default_clusters(20_000) == 156  # about 128 points per cluster
    assert default_clusters(256) == 10  # lower bound
    assert default_clusters(12) == 6  # never more than N / 2


# -- the sampler ----------------------------------------------------------------------------

def test_sampler_is_uniform_over_nonempty_clusters_and_skips_empty_ones():
    # clusters 0, 2, 5, 7 are non-empty (sizes 500, 1, 30, 7); 1, 3, 4, 6 are empty
    labels = torch.tensor([0] * 500 + [2] + [5] * 30 + [7] * 7)
    n = labels.numel()
    order = uniform_cluster_order(labels, n, torch.Generator().manual_seed(0))
    assert order.shape == (n,) and order.min() >= 0 and order.max() < n
    counts = torch.bincount(labels[order], minlength=8)
    assert counts[[1, 3, 4, 6]].sum() == 0
    nonempty = counts[[0, 2, 5, 7]]
    assert nonempty.max() - nonempty.min() <= 1 and nonempty.sum() == n
    # a cluster with enough members is drawn without replacement; a small one is cycled evenly
    big = order[labels[order] == 0]
    assert big.unique().numel() == big.numel()
    small = torch.bincount(order[labels[order] == 7])[500 + 1 + 30:]
    assert small.max() - small.min() <= 1
    # deterministic from its generator, different with another seed
    assert torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(0)))
    assert not torch.equal(order, uniform_cluster_order(labels, n, torch.Generator().manual_seed(1)))


def test_sampler_edge_cases():
    g = torch.Generator().manual_seed(0)
    one = uniform_cluster_order(torch.zeros(10, dtype=torch.long), 10, g)  # a single cluster
    assert sorted(one.tolist()) == list(range(10))
    few = uniform_cluster_order(torch.tensor([3, 3, 9]), 5, g)  # fewer draws than... any n works
    assert few.numel() == 5 and set(few.tolist()) <= {0, 1, 2}


# -- the method ----------------------------------------------------------------------------

def test_head_is_reinitialised_every_epoch():
    source = TensorSource(_images(64), seed=0)
    method = DeepCluster(_small_trunk(), 100, DeepClusterConfig(clusters=4))
    method.begin_epoch(0, source)
    head0, opt0 = method.head, method.optimizers()["head"]
    initial = head0.weight.detach().clone()
    assert head0.out_features == 4 and not opt0.state
    method.train()
    method.step(source.fetch(torch.arange(16)), 0)
    assert opt0.state and method.optimizers()["trunk"].state
    trained = head0.weight.detach().clone()

    method.begin_epoch(1, source)
    head1, opt1 = method.head, method.optimizers()["head"]
    assert head1 is not head0 and opt1 is not opt0
    assert not opt1.state  # a fresh optimiser: no momentum from the previous epoch's head
    assert all(p is q for p, q in zip(opt1.param_groups[0]["params"], head1.parameters()))
    assert not torch.equal(head1.weight, initial) and not torch.equal(head1.weight, trained)
    assert torch.all(head1.bias == 0)
    assert method.optimizers()["trunk"].state  # the trunk's optimiser persists


def test_sample_i_is_the_same_patch_every_epoch():
    from monossl.data.patch_config import make_config
    from monossl.data.patches import PatchStream
    from monossl.data.sources import load_images

    stream = PatchStream(load_images(["builtin:astronaut"]), make_config("all", size=32), seed=5)
    source = StreamSource(stream, length=64, seed=5)
    in_order = source.fetch(torch.arange(64))["images"]
    perm = source.order(3)  # how a training epoch fetches them: shuffled, in batches
    shuffled = torch.cat([source.fetch(perm[i:i + 16])["images"] for i in range(0, 64, 16)])
    assert torch.equal(shuffled, in_order[perm])
    # and the method's feature extraction sees the same patches in every epoch
    method = DeepCluster(_small_trunk(), 100, DeepClusterConfig(clusters=4, feature_batch=24))
    assert torch.equal(method._features(source, torch.arange(64)), method._features(source, torch.arange(64)))
    # so the clustering of an epoch is a function of (trunk, seed, epoch) alone
    labels_a, _ = method.cluster(source, 2)
    labels_b, _ = method.cluster(source, 2)
    assert torch.equal(labels_a, labels_b)


def test_begin_epoch_order_log_and_sobel_trunk():
    source = TensorSource(_images(64), seed=1)
    method = DeepCluster(_small_trunk(sobel=True), 100, DeepClusterConfig(clusters=5))
    out = method.begin_epoch(0, source)
    assert out["order"].shape == (64,) and out["order"].dtype == torch.long
    log = out["log"]
    assert {"k", "clusters_nonempty", "largest_cluster_frac", "cluster_time_s", "collapse"} <= set(log)
    assert log["k"] == 5 and all(isinstance(v, float) for v in log.values())
    counts = torch.bincount(method.labels[out["order"]], minlength=5)
    assert counts[counts > 0].max() - counts[counts > 0].min() <= 1
    method.train()
    metrics = method.step(source.fetch(out["order"][:16]), 0)
    assert set(metrics) == {"loss", "cluster_acc", "lr"} and metrics["lr"] == DeepClusterConfig().lr == 0.1


def test_collapse_is_flagged_and_warned(caplog):
    grey = torch.full((40, 3, 32, 32), 128, dtype=torch.uint8)  # identical images: identical features
    method = DeepCluster(_small_trunk(), 100, DeepClusterConfig(clusters=4))
    out = method.begin_epoch(0, TensorSource(grey, seed=0))
    assert out["log"]["collapse"] == 1.0 and out["log"]["largest_cluster_frac"] > 0.5
    assert [r.levelname for r in caplog.records if "collapsed" in r.getMessage()] == ["WARNING"]
    assert out["order"].shape == (40,)  # the sampler still works on what is left


def _run(tmp, source, steps, stop_after=None):
    method = DeepCluster(_small_trunk(), steps, DeepClusterConfig(clusters=6))
    loop = LoopConfig(total_steps=steps, batch_size=16, seed=3, log_every=1, checkpoint_every=2, stop_after=stop_after)
    return method, train(method, source, loop, tmp, CPU, progress=False)


def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    source = TensorSource(_images(64), seed=3)  # 64 images / batch 16: 4 steps an epoch, 3 epochs
    whole, _ = _run(tmp_path / "a", source, 12)
    _, result = _run(tmp_path / "b", source, 12, stop_after=4)  # stops at an epoch boundary: re-clusters
    _, result = _run(tmp_path / "b", source, 12, stop_after=6)  # stops in the middle of epoch 1
    assert not result["finished"] and result["step"] == 6
    resumed, result = _run(tmp_path / "b", source, 12)  # what a fresh process does
    assert result["finished"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(whole.labels, resumed.labels)

    def log(run):
        return [{k: v for k, v in r.items() if not k.endswith("_s")}
                for r in read_jsonl(tmp_path / run / "metrics.jsonl")]

    log_a, log_b = log("a"), log("b")
    assert log_a == log_b
    epochs = [r for r in log_a if r.get("event") == "epoch_start"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and "nmi_prev" in epochs[1]


def test_tiny_run_through_the_cli(tmp_path):
    pytest.importorskip("monossl.data.patches", reason="the patch stream (monossl.data.patches) is not available")
    from monossl.cli import main

    out = tmp_path / "dc"
    assert main(["pretrain", "--method", "deepcluster", "--image", "builtin:astronaut", "--num-patches", "256",
                 "--epochs", "2", "--batch-size", "32", "--clusters", "8", "--widths", "8,8,16,16", "--out", str(out),
                 "--quiet"]) == 0
    assert (out / "trunk.pt").exists()
    records = read_jsonl(out / "metrics.jsonl")
    epochs = [r for r in records if r.get("event") == "epoch_start"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert r["k"] == 8 and 1 <= r["clusters_nonempty"] <= 8 and 0 < r["largest_cluster_frac"] <= 1
        assert r["cluster_time_s"] >= 0 and r["collapse"] in (0.0, 1.0)
    assert 0 <= epochs[1]["nmi_prev"] <= 1
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["step"] == 16 and all(np.isfinite(r["loss"]) and 0 <= r["cluster_acc"] <= 100 for r in steps)
    config = json.loads((out / "config.json").read_text())
    assert config["method_config"]["clusters"] == 8 and config["total_steps"] == 16
    # DeepCluster gets the Sobel front-end unless told otherwise
    assert config["arch_config"]["sobel"] is True and config["method_config"]["lr"] == 0.1
    from monossl.models import load_trunk

    assert load_trunk(out)[0].sobel is not None

    plain = tmp_path / "dc-rgb"
    assert main(["pretrain", "--method", "deepcluster", "--image", "builtin:astronaut", "--num-patches", "64",
                 "--steps", "1", "--batch-size", "32", "--clusters", "4", "--widths", "8,8,16,16", "--no-sobel",
                 "--out", str(plain), "--quiet"]) == 0
    assert json.loads((plain / "config.json").read_text())["arch_config"]["sobel"] is False
