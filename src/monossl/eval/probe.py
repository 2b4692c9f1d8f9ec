"""The probe run: linear probes on every conv tap of a frozen trunk, trained and scored (PAPER.md §4).

The trunk is frozen and in eval mode. All taps are read in one forward pass; each tap's
post-ReLU map is pooled to a few thousand values, flattened, passed through
`BatchNorm1d(d, affine=False)` and one `Linear(d, classes)` (`LinearProbes`). All the probes
train together (the summed cross-entropy; the heads share no parameters, so each trains as if
alone) with SGD, momentum 0.9 and the protocol's step schedule.

Two paths, the same training loop (features.py): cached features (no train augmentation and one
test crop, e.g. `cifar`) or streamed through the trunk every batch (augmentation or ten crops).
Both draw the same minibatches (a seeded permutation per epoch, `epoch_batches`) and round
features to fp16, so for a no-augmentation protocol they give the same probes up to float noise.
Standardised cached features train through `FusedHeads` (hand-written gradient, the same model as
autograd up to float rounding, ~2x faster), its matmuls in bf16 where the hardware has it, else in fp32.

Library use (what `monossl compare` calls):

    result = probe(trunk, train, test, get_protocol("cifar"), device="auto", seed=0)
    result["taps"]["conv2"]["top1"]      # final-epoch top-1 (%)

`result` is a `ProbeResult`: what results.json holds; `results_markdown(result)` is results.md.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal, overload

import torch
import torch.nn.functional as F
from tqdm import tqdm

from monossl.data.image_sets import LabelledImages
from monossl.device import resolve_device
from monossl.distributed import all_sum, data_parallel, is_main, world
from monossl.errors import UserError
from monossl.eval.features import (
    FeatureRunner,
    Moments,
    cache_stats,
    matmul_precision,
    pooled_shapes,
    probe_matmul_dtype,
    progress_bar,
    standardize_,
)
from monossl.eval.knn import coarser, knn_accuracy
from monossl.eval.linear_probes import FusedHeads, LinearProbes
from monossl.eval.protocols import ProbeProtocol, check_trunk, get_protocol
from monossl.eval.results import EpochRecord, ProbeResult, TapResult, Timings, results_markdown, write_results
from monossl.models import Trunk, fuse_batchnorm
from monossl.runs import environment
from monossl.seeds import derive_seed

log = logging.getLogger(__name__)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The minibatches (index tensors) of one epoch: a seeded permutation; a last batch of 1 is dropped
    (BatchNorm cannot train on it)."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    batches = list(torch.randperm(n, generator=g).split(batch_size))
    if len(batches[-1]) < 2:
        batches.pop()
    return batches


@overload
def probe(trunk: Trunk, train: LabelledImages, test: LabelledImages, protocol: ProbeProtocol | str, *,
          device: str | torch.device = "auto", seed: int = 0,
          out_dir: str | Path | None = None, progress: bool = True, verbose: bool = True, meta: dict | None = None,
          dataset: str | None = None, cache: bool = True, workers: int | None = None,
          return_probes: Literal[False] = False, knn: tuple[int, ...] = (), knn_values: int | None = None,
          matmul_dtype: str | torch.dtype = "auto") -> ProbeResult: ...


@overload
def probe(trunk: Trunk, train: LabelledImages, test: LabelledImages, protocol: ProbeProtocol | str, *,
          device: str | torch.device = "auto", seed: int = 0,
          out_dir: str | Path | None = None, progress: bool = True, verbose: bool = True, meta: dict | None = None,
          dataset: str | None = None, cache: bool = True, workers: int | None = None,
          return_probes: Literal[True], knn: tuple[int, ...] = (), knn_values: int | None = None,
          matmul_dtype: str | torch.dtype = "auto") -> tuple[ProbeResult, LinearProbes]: ...


def probe(trunk: Trunk, train: LabelledImages, test: LabelledImages, protocol: ProbeProtocol | str, *,
          device: str | torch.device = "auto", seed: int = 0,
          out_dir: str | Path | None = None, progress: bool = True, verbose: bool = True, meta: dict | None = None,
          dataset: str | None = None, cache: bool = True, workers: int | None = None,
          return_probes: bool = False, knn: tuple[int, ...] = (), knn_values: int | None = None,
          matmul_dtype: str | torch.dtype = "auto") -> ProbeResult | tuple[ProbeResult, LinearProbes]:
    """Train linear probes on every tap of a frozen `trunk`; returns the results dict.

    train / test: datasets of `monossl.data.datasets` (TensorImages or FolderImages, or any
    dataset with `.labels`, `.classes` and `with_transform`). protocol: a ProbeProtocol or a
    preset name. device: "auto"/"cpu"/"cuda" or a torch.device. out_dir: if given, results.json
    and results.md are written there (atomically). cache=False forces the streaming path
    (for checks). verbose prints the pooled sizes and the table; progress shows tqdm bars on a
    terminal. workers: DataLoader processes for transformed data (default: cores - 1, at most 8).
    The caller's trunk is not modified (a frozen copy is probed). Deterministic given the seed
    (on CPU). With return_probes=True returns (result, LinearProbes on the device). knn: also
    weighted k-NN with these k on the cached features of every tap (eval/knn.py; cached path only),
    average-pooled further to >= knn_values values per tap when given (`knn.coarser`).
    matmul_dtype: the probes' matmuls on standardised cached features: "auto" (bf16 where the
    hardware does it, unless MONOSSL_PROBE_BF16=0: `probe_matmul_dtype`), or torch.float32 /
    torch.bfloat16 ("float32" / "bfloat16"); other paths always multiply in fp32.
    `result["matmul_dtype"]` says which ran.
    """
    t_start = time.perf_counter()
    verbose = verbose and is_main()  # under torchrun rank 0 speaks and writes
    progress = progress and is_main()
    protocol = get_protocol(protocol) if isinstance(protocol, str) else protocol
    device = resolve_device(device) if isinstance(device, str) else device
    num_classes = _check_inputs(trunk, train, test, protocol)
    if knn and not (cache and protocol.cacheable):
        raise UserError(f"k-NN needs cached features: protocol {protocol.name} augments or crops at test time")
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1))

    frozen = copy.deepcopy(trunk).to(device).eval().requires_grad_(False)
    frozen = fuse_batchnorm(frozen).to(memory_format=torch.channels_last)
    shapes = pooled_shapes(frozen, protocol)
    dims = {k: v["pooled_size"] for k, v in shapes.items()}
    use_cache = cache and protocol.cacheable
    fixed = protocol.bn_stats == "dataset"
    # bf16 matmuls only on standardised cached features (no BatchNorm in the step)
    matmul_dtype = _matmul_dtype(matmul_dtype, device) if use_cache and fixed else torch.float32
    if verbose:
        _announce(protocol, train, test, dataset, num_classes, device, seed, use_cache, shapes)

    runner = FeatureRunner(frozen, train, test, protocol, device, seed, progress, workers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # transforms in the main process draw from the global RNG
        probes = LinearProbes(dims, num_classes, generator=torch.Generator().manual_seed(seed)).to(device)

        t0 = time.perf_counter()
        cached = _prepare_features(runner, probes, shapes, use_cache, fixed, matmul_dtype, knn, knn_values,
                                   num_classes)
        knn_result = cached[4] if cached and knn else None
        extract_s = round(time.perf_counter() - t0, 2)
        quiet_bars = not (progress and sys.stderr.isatty())  # then log a line per epoch instead
        if verbose and quiet_bars and (use_cache or fixed):
            log.info(f"  features{'' if use_cache else ' statistics'}: {extract_s:.0f} s")

        history, train_s, eval_s = _train(
            runner, probes, cached, standardized=use_cache and fixed, matmul_dtype=matmul_dtype,
            log_epochs=verbose and quiet_bars)
    timings = Timings(extract_s=extract_s, train_s=train_s, eval_s=eval_s,
                      total_s=round(time.perf_counter() - t_start, 2))
    probes.eval()

    result: ProbeResult = {
        "protocol": protocol.to_dict(),
        "seed": seed,
        "dataset": dataset or getattr(train, "source", None),
        "n_train": len(train),
        "n_test": len(test),
        "num_classes": num_classes,
        "trunk": {"arch": trunk.arch, "config": dict(getattr(trunk, "config", {})), "meta": dict(meta or {})},
        "taps": _taps(history, shapes),
        "cached_features": use_cache,
        "matmul_dtype": str(matmul_dtype).replace("torch.", ""),
        "device": str(device),
        "timings": timings,
        "history": history,
        "environment": environment(),
    }
    if knn_result is not None:
        result["knn"], result["knn_dims"], result["knn_s"] = knn_result
    if verbose:
        log.info(results_markdown(result).rstrip("\n"))
        t = timings
        log.info(f"  time: {t['total_s']:.0f} s (features{' and statistics' if fixed and not use_cache else ''} "
                 f"{t['extract_s']:.0f} s, probe training {t['train_s']:.0f} s incl. evaluation {t['eval_s']:.0f} s)")
    if out_dir is not None and is_main():
        write_results(out_dir, result)
        if verbose:
            log.info(f"  wrote {Path(out_dir) / 'results.json'} and results.md")
    return (result, probes) if return_probes else result


def _check_inputs(trunk: Trunk, train: LabelledImages, test: LabelledImages, protocol: ProbeProtocol) -> int:
    """One-line errors for a trunk, protocol or data the probes cannot use; returns the class count."""
    check_trunk(trunk, protocol)
    if protocol.bn_stats not in ("batch", "dataset"):
        raise ValueError(f"bn_stats must be 'batch' or 'dataset', not {protocol.bn_stats!r}")
    classes = list(train.classes)
    if list(test.classes) != classes:
        raise UserError(f"train and test have different classes ({len(classes)} vs {len(test.classes)})")
    if len(train) < 2 or len(test) < 1:
        raise UserError(f"too few images to probe: {len(train)} train, {len(test)} test")
    return len(classes)


def _matmul_dtype(requested: str | torch.dtype, device: torch.device) -> torch.dtype:
    """probe()'s `matmul_dtype` argument -> the dtype of the matmuls on standardised cached features."""
    if requested == "auto":
        return probe_matmul_dtype(device)
    dtype = getattr(torch, requested, None) if isinstance(requested, str) else requested
    if dtype not in (torch.float32, torch.bfloat16):
        raise UserError(f"matmul_dtype must be 'auto', float32 or bfloat16, not {requested!r}")
    return dtype


def _announce(protocol: ProbeProtocol, train: LabelledImages, test: LabelledImages, dataset: str | None,
              num_classes: int, device: torch.device, seed: int, use_cache: bool, shapes: dict[str, dict]) -> None:
    """The protocol, the data and each tap's pooling, before anything runs."""
    log.info(f"probe {protocol.summary()}")
    log.info(f"  data: {dataset or getattr(train, 'source', '?')}: {len(train)} train / {len(test)} test, "
             f"{num_classes} classes; device {device}; seed {seed}; "
             f"{'cached' if use_cache else 'streamed'} features; BatchNorm statistics: {protocol.bn_stats}")
    for k, s in shapes.items():
        log.info(f"  {k}: {'x'.join(map(str, s['shape']))} -> {protocol.pools[k].describe()} -> "
                 f"{'x'.join(map(str, s['pooled_shape']))} = {s['pooled_size']} values")
    if use_cache:
        mb = (len(train) + len(test)) * sum(s["pooled_size"] for s in shapes.values()) * 2 / 2**20
        log.info(f"  feature cache (fp16): {mb:.0f} MiB")


def _prepare_features(runner: FeatureRunner, probes: LinearProbes, shapes: dict[str, dict], use_cache: bool,
                      fixed: bool, matmul_dtype: torch.dtype,
                      knn: tuple[int, ...] = (), knn_values: int | None = None, num_classes: int | None = None):
    """Cached path: extract the features (standardised with the training set's statistics when
    they are fixed) and return (train cache, train labels, test cache, test labels, k-NN result:
    ({tap: {"k20": %, ...}}, {tap: feature size}, seconds) on the raw features when `knn` is given,
    else None).
    Streamed path: one pass over the training data for the fixed statistics, if any; returns None."""
    protocol, device = runner.protocol, runner.device
    dims = {k: v["pooled_size"] for k, v in shapes.items()}
    if use_cache:
        train_cache = runner.extract(runner.train, dims, "features (train)")
        test_cache = runner.extract(runner.test, dims, "features (test)")
        train_labels, test_labels = runner.train.labels.clone(), runner.test.labels.clone()
        knn_result = None
        if knn:  # on the raw pooled features, before the probes' standardisation
            t0 = time.perf_counter()
            scores, sizes = {}, {}
            for tap in dims:
                train_f, test_f = train_cache[tap], test_cache[tap]
                if knn_values:
                    grid = shapes[tap]["pooled_shape"]
                    train_f, test_f = coarser(train_f, grid, knn_values), coarser(test_f, grid, knn_values)
                scores[tap] = knn_accuracy(train_f, train_labels, test_f, test_labels, ks=knn,
                                           num_classes=num_classes, dtype=probe_matmul_dtype(device))
                sizes[tap] = train_f.shape[1]
            knn_result = (scores, sizes, round(time.perf_counter() - t0, 2))
        if fixed:
            stats = cache_stats(train_cache)
            probes.set_stats({k: (m.to(device), v.to(device)) for k, (m, v) in stats.items()})
            eps = probes.head(next(iter(dims)))[0].eps
            # stored as the matmuls will read them (bf16 or fp16): no per-step conversion
            store = torch.float16 if matmul_dtype == torch.float32 else matmul_dtype
            standardize_(train_cache, stats, eps, store)
            standardize_(test_cache, stats, eps, store)
        return train_cache, train_labels, test_cache, test_labels, knn_result
    if fixed:  # one pass over the training data (with its transform) for the statistics
        moments = Moments()
        batches = epoch_batches(len(runner.train), protocol.batch_size, runner.seed, 0)
        for feats, _y in runner.streamed_batches(batches, 0):
            moments.add({k: v.cpu() for k, v in feats.items()})
        moments.all_sum()
        probes.set_stats({k: (m.to(device), v.to(device)) for k, (m, v) in moments.result().items()})
    return None


def _train(runner: FeatureRunner, probes: LinearProbes, cached: tuple | None, standardized: bool,
           matmul_dtype: torch.dtype,
           log_epochs: bool) -> tuple[list[EpochRecord], float, float]:
    """The probes' SGD epochs, evaluated on test every `eval_every` epochs and at the last;
    returns (history, training seconds, evaluation seconds). `standardized`: the cache already
    holds what the fixed BatchNorm outputs. Such a cache trains through `FusedHeads` (hand-written gradient,
    the same model up to float rounding, matmuls in `matmul_dtype`); streamed features and BatchNorm in
    the step through autograd."""
    protocol, device, seed = runner.protocol, runner.device, runner.seed
    n_train = len(runner.train)
    fused: FusedHeads | None = None
    if cached is not None and standardized:
        fused = FusedHeads(probes, device, protocol.momentum, protocol.weight_decay, protocol.batch_size,
                           matmul_dtype)
    else:
        opt = torch.optim.SGD(probes.parameters(), lr=protocol.lr, momentum=protocol.momentum,
                              weight_decay=protocol.weight_decay)
        # streamed under torchrun the ranks see different rows: their gradients are averaged by DDP
        model = data_parallel(probes) if cached is None else probes
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(protocol.milestones), gamma=protocol.gamma)
    lr = protocol.lr
    t0 = time.perf_counter()
    eval_s = 0.0
    history: list[EpochRecord] = []
    steps_per_epoch = len(epoch_batches(n_train, protocol.batch_size, seed, 1))
    with progress_bar(protocol.epochs * steps_per_epoch, f"probe {protocol.name}", runner.progress,
                      unit="step") as bar:
        for epoch in range(1, protocol.epochs + 1):
            batches = epoch_batches(n_train, protocol.batch_size, seed, epoch)
            if fused is not None and cached is not None:  # fused trains on the cache
                loss_sum, seen = fused.epoch(cached[0], cached[1], batches, lr, lambda: bar.update(1))
            else:
                lr = opt.param_groups[0]["lr"]
                loss_sum, seen = _autograd_epoch(runner, probes, model, opt, cached, batches, standardized,
                                                 matmul_dtype, epoch, bar)
                sched.step()
            record: EpochRecord = {"epoch": epoch, "lr": lr,
                                   "loss": {k: round(v / max(seen, 1), 4) for k, v in loss_sum.items()}}
            if fused is not None:  # MultiStepLR's update of the autograd path's lr
                lr *= protocol.gamma ** list(protocol.milestones).count(epoch)
            if epoch % protocol.eval_every == 0 or epoch == protocol.epochs:
                te = time.perf_counter()
                if fused is not None and cached is not None:
                    acc = fused.score(cached[2], cached[3])
                elif cached is not None:
                    probes.eval()
                    acc = runner.cached_eval(probes, cached[2], cached[3], standardized, matmul_dtype)
                else:
                    probes.eval()
                    acc = runner.streamed_eval(probes)
                eval_s += time.perf_counter() - te
                record["top1"] = {k: round(a[0], 2) for k, a in acc.items()}
                record["top5"] = {k: round(a[1], 2) for k, a in acc.items()}
                bar.set_postfix_str(f"epoch {epoch} top-1 " + "/".join(f"{a[0]:.1f}" for a in acc.values()))
                if log_epochs:
                    log.info(f"  epoch {epoch}/{protocol.epochs} lr {lr:g}: top-1 "
                             + " ".join(f"{k} {a[0]:.1f}" for k, a in acc.items())
                             + f" ({time.perf_counter() - t0:.0f} s)")
            history.append(record)
    if fused is not None:
        fused.store(probes)
    return history, round(time.perf_counter() - t0, 2), round(eval_s, 2)


def _autograd_epoch(runner: FeatureRunner, probes: LinearProbes, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    cached: tuple | None, batches: list[torch.Tensor], standardized: bool,
                    matmul_dtype: torch.dtype, epoch: int, bar: tqdm) -> tuple[dict[str, float], int]:
    """One epoch of autograd steps (streamed features, or BatchNorm in the step) of `model`
    (the probes, under DDP when streamed and distributed); returns ({tap: summed cross-entropy}, images seen,
    summed over ranks when streamed)."""
    device = runner.device
    probes.train()
    if cached is not None:
        train_cache, train_labels = cached[:2]
        it = runner.cached_batches(train_cache, train_labels, batches, matmul_dtype)
    else:
        it = runner.streamed_batches(batches, epoch)
    loss_sum = {k: 0.0 for k in probes.heads}
    seen = 0
    for feats, y in it:
        opt.zero_grad(set_to_none=True)
        with matmul_precision(device, matmul_dtype):
            logits = model(feats, standardized=standardized)
        losses = {k: F.cross_entropy(lg.float(), y) for k, lg in logits.items()}
        torch.stack(list(losses.values())).sum().backward()  # the heads are independent: each gets its own gradient
        for k, loss in losses.items():
            loss_sum[k] += loss.item() * len(y)
        opt.step()
        seen += len(y)
        bar.update(1)
    if cached is None and world()[1] > 1:
        sums = all_sum(torch.tensor([seen, *loss_sum.values()], dtype=torch.float64)).tolist()
        seen, loss_sum = sums[0], dict(zip(loss_sum, sums[1:]))
    return loss_sum, seen


def _taps(history: list[EpochRecord], shapes: dict[str, dict]) -> dict[str, TapResult]:
    """Each tap's shapes, final-epoch accuracy and best top-1 over the evaluated epochs."""
    final = history[-1]
    evaluated = [h for h in history if "top1" in h]
    taps: dict[str, TapResult] = {}
    for k in shapes:
        best = max(evaluated, key=lambda h: h["top1"][k])  # the first epoch reaching the maximum
        taps[k] = {"shape": shapes[k]["shape"], "pooled_shape": shapes[k]["pooled_shape"],
                   "pooled_size": shapes[k]["pooled_size"], "top1": final["top1"][k], "top5": final["top5"][k],
                   "best_top1": best["top1"][k], "best_epoch": best["epoch"]}
    return taps
