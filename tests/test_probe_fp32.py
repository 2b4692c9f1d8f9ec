"""The probes' trainer on standardised caches (`FusedHeads`: hand-written gradient): in fp32 on the
fp16 cache, the same model as autograd + torch.optim.SGD and as the streamed path; in bf16 on the bf16
cache, autograd under bf16 autocast up to bf16 rounding; the switches that select the matmul dtype."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from monossl import runs
from monossl.data.image_sets import TensorImages
from monossl.errors import UserError
from monossl.eval.features import probe_matmul_dtype
from monossl.eval.linear_probes import FusedHeads, LinearProbes, score
from monossl.eval.probe import epoch_batches, probe
from monossl.eval.protocols import get_protocol
from monossl.models import build_trunk


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def colour_dataset(n, seed, noise=30):
    """4 classes, each a solid colour with uniform noise of +-`noise` (separable at 30)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[220, 30, 30], [30, 200, 40], [30, 40, 220], [200, 200, 40]])
    y = torch.arange(n) % 4
    x = colours[y][:, :, None, None] + torch.randint(-noise, noise + 1, (n, 3, 32, 32), generator=g)
    return TensorImages(x.clamp(0, 255).to(torch.uint8), y, ["red", "green", "blue", "yellow"], "colours")


def noisy_cache(n=300, dims=None, classes=10, seed=0):
    """Standardised-looking fp16 features of two taps for n train and n test images, the classes
    overlapping (test accuracy well below 100%)."""
    g = torch.Generator().manual_seed(seed)
    dims = dims or {"a": 96, "b": 64}
    labels = torch.randint(0, classes, (2 * n,), generator=g)
    feats = {k: (0.3 * torch.randn(classes, d, generator=g)[labels] + torch.randn(2 * n, d, generator=g)).half()
             for k, d in dims.items()}
    train = {k: v[:n].contiguous() for k, v in feats.items()}
    test = {k: v[n:].contiguous() for k, v in feats.items()}
    return train, labels[:n], test, labels[n:], dims, classes


def autograd_epoch(ref: LinearProbes, opt: torch.optim.Optimizer, cache: dict, labels: torch.Tensor,
                   batches: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """One epoch of the reference: autograd + torch.optim.SGD on the cache's rows as `dtype` (bf16 under
    bf16 autocast); returns {tap: summed cross-entropy}."""
    sums = dict.fromkeys(cache, 0.0)
    for idx in batches:
        opt.zero_grad()
        precision = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with precision:
            logits = ref({k: v[idx].to(dtype) for k, v in cache.items()}, standardized=True)
        losses = {k: F.cross_entropy(lg.float(), labels[idx]) for k, lg in logits.items()}
        sum(losses.values()).backward()
        opt.step()
        for k in cache:
            sums[k] += losses[k].item() * len(idx)
    return sums


@pytest.mark.parametrize("threads", [1, 2])  # 2+: the minibatch in two row blocks, one bmm
def test_fp32_heads_train_what_autograd_and_torch_sgd_train(threads):
    """Three epochs (lr step after the second, a last batch of 13: one row block) on the same fp16
    cache and minibatches: weights within 2e-6 (float rounding: 1.8e-7 seen, on weights of ~0.5), the
    epochs' summed losses within 1e-6 relative (1.4e-7 seen), the same test counts (to one image)."""
    torch.set_num_threads(threads)
    cache, labels, test, test_labels, dims, classes = noisy_cache(n=301)  # 9 x 32 + 13 rows
    ref = LinearProbes(dims, classes, generator=torch.Generator().manual_seed(1))
    heads = FusedHeads(ref, torch.device("cpu"), momentum=0.9, weight_decay=5e-4, max_batch=32)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    for epoch in range(1, 4):
        batches = epoch_batches(len(labels), 32, 0, epoch)
        assert len(batches[-1]) == 13  # odd: one row block
        lr = opt.param_groups[0]["lr"]
        ref_sums = autograd_epoch(ref, opt, cache, labels, batches)
        sched.step()
        sums, seen = heads.epoch(cache, labels, batches, lr)
        assert seen == len(labels)
        for k in dims:
            assert sums[k] == pytest.approx(ref_sums[k], rel=1e-6), (epoch, k)

    trained = LinearProbes(dims, classes)
    heads.store(trained)
    for k in dims:
        w_ref, w = ref.heads[k][1].weight, trained.heads[k][1].weight
        assert w_ref.abs().max() > 0.1  # the weights moved from their N(0, 0.01) start
        assert (w - w_ref).abs().max() < 2e-6, k
        assert (trained.heads[k][1].bias - ref.heads[k][1].bias).abs().max() < 2e-6, k
    expected = score(ref, [({k: v.float() for k, v in test.items()}, test_labels)], len(test_labels), 1,
                     torch.device("cpu"), True)
    got = heads.score(test, test_labels)
    for k in dims:
        assert 20.0 < expected[k][0] < 90.0, expected  # neither chance nor separable: the counts mean something
        assert got[k][0] == pytest.approx(expected[k][0], abs=100 / len(test_labels))
        assert got[k][1] == pytest.approx(expected[k][1], abs=100 / len(test_labels))


def test_bf16_heads_train_what_autograd_under_bf16_autocast_trains():
    """The same three epochs on a bf16 cache: against autograd + torch.optim.SGD under bf16 autocast (both
    round the weights to bf16 each step and take bf16 products; autocast also adds the bias in bf16),
    epoch losses within 3e-3 relative (1.1e-3 seen) and weights within 5e-3 (1.5e-3 seen, weights
    ~0.7); against the fp32 trainer on the same values, weights differ by more than 1e-4 (1.0e-3
    seen: bf16 products really ran) and less than 5e-3; test counts within 3 of 301 images."""
    torch.set_num_threads(2)
    cache, labels, test, test_labels, dims, classes = noisy_cache(n=301)
    cache = {k: v.to(torch.bfloat16) for k, v in cache.items()}
    test = {k: v.to(torch.bfloat16) for k, v in test.items()}
    ref = LinearProbes(dims, classes, generator=torch.Generator().manual_seed(1))
    heads = FusedHeads(ref, torch.device("cpu"), 0.9, 5e-4, max_batch=32, matmul_dtype=torch.bfloat16)
    heads32 = FusedHeads(ref, torch.device("cpu"), 0.9, 5e-4, max_batch=32)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2], gamma=0.1)
    with pytest.raises(ValueError, match="bfloat16 caches"):
        heads.epoch({k: v.half() for k, v in cache.items()}, labels, [torch.arange(8)], 0.1)
    for epoch in range(1, 4):
        batches = epoch_batches(len(labels), 32, 0, epoch)
        lr = opt.param_groups[0]["lr"]
        ref_sums = autograd_epoch(ref, opt, cache, labels, batches, torch.bfloat16)
        sched.step()
        sums, _ = heads.epoch(cache, labels, batches, lr)
        heads32.epoch({k: v.half() for k, v in cache.items()}, labels, batches, lr)  # bf16 values are exact in fp16
        for k in dims:
            assert sums[k] == pytest.approx(ref_sums[k], rel=3e-3), (epoch, k)
    trained, trained32 = LinearProbes(dims, classes), LinearProbes(dims, classes)
    heads.store(trained)
    heads32.store(trained32)
    for k in dims:
        w, w_ref, w32 = (p.heads[k][1].weight for p in (trained, ref, trained32))
        assert w_ref.abs().max() > 0.1
        assert (w - w_ref).abs().max() < 5e-3, k
        assert 1e-4 < (w - w32).abs().max() < 5e-3, k
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = score(ref, [(test, test_labels)], len(test_labels), 1, torch.device("cpu"), True)
    got = heads.score(test, test_labels)
    for k in dims:
        assert 20.0 < expected[k][0] < 90.0, expected
        assert got[k][0] == pytest.approx(expected[k][0], abs=300 / len(test_labels))


def probe_three_ways():
    torch.manual_seed(0)
    trunk = build_trunk("cifar")
    train, test = colour_dataset(96, 3), colour_dataset(40, 4)
    proto = get_protocol("cifar").with_overrides(epochs=3, batch_size=32)
    kw = dict(device="cpu", seed=5, progress=False, verbose=False, return_probes=True)
    return (probe(trunk, train, test, proto, matmul_dtype=torch.float32, **kw),
            probe(trunk, train, test, proto, matmul_dtype="bfloat16", **kw),
            probe(trunk, train, test, proto, cache=False, **kw))


def test_fp32_path_matches_streaming_and_bf16_within_its_rounding():
    """probe() on a toy set: the fp32 path against the streamed autograd path (BatchNorm with the
    same fixed statistics in the step; features differ only by the cache's fp16 rounding after
    standardisation): weights within 2e-5 (7e-6 seen, weights ~0.05); against the bf16 path more
    than that (8e-5 to 1.2e-4 seen) but within 1e-3. A bf16 run passed off as fp32 would miss the
    first bound."""
    (r32, p32), (rbf, pbf), (rst, pst) = probe_three_ways()
    assert (r32["matmul_dtype"], rbf["matmul_dtype"], rst["matmul_dtype"]) == ("float32", "bfloat16", "float32")
    assert r32["cached_features"] and not rst["cached_features"]
    assert [h["lr"] for h in r32["history"]] == [h["lr"] for h in rst["history"]] == [0.01, 0.01, 0.01 * 0.1]
    for k in r32["taps"]:
        w32, wbf, wst = (p.heads[k][1].weight for p in (p32, pbf, pst))
        assert w32.abs().max() > 0.02
        assert (w32 - wst).abs().max() < 2e-5, k
        assert 2e-5 < (w32 - wbf).abs().max() < 1e-3, k  # bf16 products really ran in the other
        assert (p32.heads[k][1].bias - pst.heads[k][1].bias).abs().max() < 2e-5, k
        assert r32["history"][0]["loss"][k] == pytest.approx(rst["history"][0]["loss"][k], abs=2e-4)
        assert r32["taps"][k]["top1"] == rst["taps"][k]["top1"] == rbf["taps"][k]["top1"]


def test_switches_select_the_fp32_path(monkeypatch):
    torch.manual_seed(0)
    trunk = build_trunk("cifar", widths=[8, 8, 16, 16])
    train, test = colour_dataset(64, 5), colour_dataset(32, 6)
    proto = get_protocol("cifar").with_overrides(epochs=1, batch_size=32)
    kw = dict(device="cpu", seed=0, progress=False, verbose=False, return_probes=True)
    explicit, p1 = probe(trunk, train, test, proto, matmul_dtype=torch.float32, **kw)
    monkeypatch.setenv("MONOSSL_PROBE_BF16", "0")
    assert probe_matmul_dtype(torch.device("cpu")) == torch.float32
    by_env, p2 = probe(trunk, train, test, proto, **kw)
    assert explicit["matmul_dtype"] == by_env["matmul_dtype"] == "float32"
    assert all(torch.equal(a, b) for a, b in zip(p1.state_dict().values(), p2.state_dict().values()))
    # an explicit dtype wins over the environment
    assert probe(trunk, train, test, proto, matmul_dtype="bfloat16", **kw)[0]["matmul_dtype"] == "bfloat16"
    monkeypatch.setenv("MONOSSL_PROBE_BF16", "maybe")
    with pytest.raises(UserError, match="MONOSSL_PROBE_BF16"):
        probe_matmul_dtype(torch.device("cpu"))
    monkeypatch.delenv("MONOSSL_PROBE_BF16")
    auto = probe(trunk, train, test, proto, **kw)[0]
    assert auto["matmul_dtype"] == str(probe_matmul_dtype(torch.device("cpu"))).replace("torch.", "")
    with pytest.raises(UserError, match="matmul_dtype"):
        probe(trunk, train, test, proto, matmul_dtype=torch.float16, **kw)


def test_results_record_the_cpu_capability_the_kernels_ran_at():
    """A result made with the CPU held to a lower instruction set (how the README times the main job on
    a CPU without AVX512 or bf16) says so in its `environment`, as does one made at the CPU's own."""
    here = runs.environment()
    assert here["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(here["onednn_bf16"], bool)
    code = "import json; from monossl import runs; print(json.dumps(runs.environment()))"
    held = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env={**os.environ, "ATEN_CPU_CAPABILITY": "default"}).stdout)
    assert held["cpu_capability"] == "DEFAULT"
