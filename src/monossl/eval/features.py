"""Features of a frozen trunk for its linear probes: pooled taps, extracted and cached, or streamed.

Every tap's post-ReLU map is pooled (the protocol's `Pool`) and flattened; features are kept
in fp16 (`_to_store`). `FeatureRunner` holds the frozen trunk, the data and the protocol of one
probe run and gives the probe loop its features in one of two ways:

  * cached (no train augmentation and one test crop, e.g. `cifar`): the pooled features of
    train and test are extracted once, in chunks, stored fp16 (sharded over ranks under
    torchrun, then gathered), and every epoch gathers its minibatches from that cache;
  * streaming (augmentation or ten crops): every batch goes through the frozen trunk.

With BatchNorm statistics fixed to the training set's (`bn_stats="dataset"`), `Moments`
accumulates them and `standardize_` applies them to the cache once; the probes' matmuls on such
standardised features may then run in bf16 (`probe_matmul_dtype`, `matmul_precision`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import Sampler

from monossl.data.image_sets import LabelledImages, Transform
from monossl.distributed import all_sum, gather_rows, shard_range, world
from monossl.errors import UserError
from monossl.eval.linear_probes import LinearProbes, score
from monossl.eval.protocols import Pool, ProbeProtocol, test_transform, train_transform
from monossl.models import Trunk
from monossl.runs import onednn_bf16
from monossl.seeds import derive_seed

# ----------------------------------------------------------------------------- pooled taps


def pooled_features(trunk: Trunk, x: torch.Tensor, pools: dict[str, Pool]) -> dict[str, torch.Tensor]:
    """{tap: (B, d) pooled, flattened activation}, all taps from one forward pass."""
    acts = trunk.taps(x, list(pools))
    return {name: pool(acts[name]).flatten(1) for name, pool in pools.items()}


@torch.no_grad()
def pooled_shapes(trunk: Trunk, protocol: ProbeProtocol, image_size: int | None = None) -> dict[str, dict]:
    """{tap: {"shape": (C, H, W), "pooled_shape": (C, h, w), "pooled_size": C*h*w}} from one dummy image."""
    size = image_size or protocol.input_size
    was_training = trunk.training
    trunk.eval()
    try:
        p = next(trunk.parameters())
        x = torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)
        acts = trunk.taps(x, list(protocol.pools))
    finally:
        trunk.train(was_training)
    out = {}
    for name, pool in protocol.pools.items():
        a = acts[name]
        try:
            pooled = pool(a)
        except RuntimeError as exc:
            raise UserError(f"protocol {protocol.name}: {pool.describe()} does not fit tap {name} of shape "
                            f"{tuple(a.shape[1:])}: {str(exc).splitlines()[0]}") from None
        out[name] = {"shape": list(a.shape[1:]), "pooled_shape": list(pooled.shape[1:]),
                     "pooled_size": int(pooled[0].numel())}
    return out


def _to_store(f: torch.Tensor) -> torch.Tensor:
    """Features are kept (cached or not) in fp16; activations are post-ReLU, so only clamp the top."""
    return f.clamp(max=65504.0).to(torch.float16)


def _native_size(dataset: LabelledImages) -> int | None:
    """The image side of an in-memory dataset whose items need no transform, else None."""
    images = getattr(dataset, "images", None)
    if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[-1] == images.shape[-2]:
        return int(images.shape[-1])
    return None


class _Batches(torch.utils.data.Sampler):
    """A DataLoader batch sampler yielding the given minibatches (the probe loop's seeded ones)."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = batches

    def __iter__(self):
        return iter([b.tolist() for b in self.batches])

    def __len__(self):
        return len(self.batches)


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it"):
    """A tqdm bar, shown only when `enabled` and stderr is a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False)


# ----------------------------------------------------------------------------- one probe run's features


class FeatureRunner:
    """The frozen trunk, the data and the protocol of one probe run; yields features and scores."""

    def __init__(self, trunk: Trunk, train: LabelledImages, test: LabelledImages, protocol: ProbeProtocol,
                 device: torch.device, seed: int, progress: bool, workers: int):
        self.trunk, self.train, self.test = trunk, train, test
        self.protocol, self.device, self.seed = protocol, device, seed
        self.progress, self.workers = progress, workers

    # -- one batch of images -> features (fp16-rounded, as stored)
    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from monossl.device import autocast

        # channels-last: measured faster for these convs on CPU (oneDNN) as on CUDA
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            feats = pooled_features(self.trunk, x, self.protocol.pools)
        return {k: _to_store(v.float()) for k, v in feats.items()}

    def loader(self, dataset: LabelledImages, transform: Transform, batch_sampler: Sampler | None = None,
               batch_size: int | None = None, epoch: int = 0):
        kw: dict[str, Any] = dict(num_workers=self.workers, pin_memory=self.device.type == "cuda")  # DataLoader's
        if self.workers:  # worker seeds (hence random crops) from the seed and the epoch
            kw["generator"] = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset.with_transform(transform), batch_sampler=batch_sampler, **kw)
        return torch.utils.data.DataLoader(dataset.with_transform(transform), batch_size=batch_size,
                                           shuffle=False, **kw)

    def _native(self, dataset: LabelledImages) -> bool:
        return _native_size(dataset) == self.protocol.input_size

    # -- cached path
    def extract(self, dataset: LabelledImages, dims: dict[str, int], desc: str) -> dict[str, torch.Tensor]:
        """fp16 features of every image; under torchrun each rank extracts one block and all get all."""
        total = len(dataset)
        if world()[1] > 1:
            start, stop = shard_range(total)
            cache = self._extract(dataset.restricted(torch.arange(start, stop)), dims, desc)
            return {k: gather_rows(v, total) for k, v in cache.items()}
        return self._extract(dataset, dims, desc)

    def _extract(self, dataset: LabelledImages, dims: dict[str, int], desc: str) -> dict[str, torch.Tensor]:
        n = len(dataset)
        store = self.device if (self.device.type == "cuda" and _fits_on_gpu(n, dims)) else torch.device("cpu")
        cache = {k: torch.empty(n, d, dtype=torch.float16, device=store) for k, d in dims.items()}
        chunk = 256
        with progress_bar(n, desc, self.progress, unit="img") as bar:
            if self._native(dataset):  # in-memory uint8 images at the protocol's size: slice them
                batches = ((dataset.images[i:i + chunk].float().div_(255), None) for i in range(0, n, chunk))
            else:
                batches = self.loader(dataset, test_transform(self.protocol), batch_size=chunk)
            i = 0
            for x, _y in batches:
                for k, v in self.features(x).items():
                    cache[k][i:i + len(x)] = v.to(store)
                i += len(x)
                bar.update(len(x))
        return cache

    def cached_batches(self, cache: dict[str, torch.Tensor], labels: torch.Tensor, batches: Iterable[torch.Tensor],
                       dtype: torch.dtype = torch.float32):
        # Reused gather buffers: fresh multi-MB tensors every step cost page faults (sys time) on CPU.
        # Reusing them is safe: the previous step's backward is done before the next gather.
        bufs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for idx in batches:
            feats = {}
            for k, v in cache.items():
                b = len(idx)
                if k not in bufs or bufs[k][0].shape[0] < b:
                    gathered = torch.empty(b, v.shape[1], dtype=v.dtype, device=v.device)
                    converted = gathered if v.dtype == dtype and v.device == self.device else \
                        torch.empty(b, v.shape[1], dtype=dtype, device=self.device)
                    bufs[k] = (gathered, converted)
                half, full = bufs[k][0][:b], bufs[k][1][:b]
                # 16-bit rows gathered as int16: the same bytes, and a faster index_select kernel on CPU
                torch.index_select(v.view(torch.int16), 0, idx.to(v.device), out=half.view(torch.int16))
                if full is not half:
                    full.copy_(half)  # blocking: `half` is reused at the next step
                feats[k] = full
            yield feats, labels[idx].to(self.device)

    def cached_eval(self, probes: LinearProbes, cache: dict[str, torch.Tensor], labels: torch.Tensor,
                    standardized: bool, dtype: torch.dtype = torch.float32):
        chunk = 1024
        batches = (({k: v[i:i + chunk].to(self.device, dtype) for k, v in cache.items()}, labels[i:i + chunk])
                   for i in range(0, len(labels), chunk))
        with matmul_precision(self.device, dtype):
            return score(probes, batches, len(labels), 1, self.device, standardized)

    # -- streaming path
    def streamed_batches(self, batches: list[torch.Tensor], epoch: int):
        rank, size = world()
        if size > 1:  # each rank trains on its rows of every global batch; gradients are averaged
            batches = [idx[rank::size] for idx in batches]
        if self._native(self.train) and self.protocol.train_aug == "none":
            # no augmentation on in-memory data at its own size: exactly the cache path's images
            for idx in batches:
                x = self.train.images[idx].float().div_(255)
                yield {k: v.float() for k, v in self.features(x).items()}, self.train.labels[idx].to(self.device)
            return
        for x, y in self.loader(self.train, train_transform(self.protocol), batch_sampler=_Batches(batches),
                                epoch=epoch):
            yield {k: v.float() for k, v in self.features(x).items()}, y.to(self.device)

    def streamed_eval(self, probes: LinearProbes):
        n_crops = self.protocol.test_crops
        bs = max(1, self.protocol.batch_size // n_crops)
        test = self.test
        if world()[1] > 1:  # each rank scores one block of the test set; _score sums the counts
            test = test.restricted(torch.arange(*shard_range(len(test))))
        if self._native(test) and n_crops == 1 and not self.protocol.test_resize:
            it = ((test.images[i:i + bs].float().div_(255), test.labels[i:i + bs])
                  for i in range(0, len(test), bs))
        else:
            it = self.loader(test, test_transform(self.protocol), batch_size=bs)

        def batches():
            for x, y in it:
                if x.ndim == 5:  # (B, crops, C, H, W) -> (B * crops, C, H, W), crops of an image consecutive
                    x = x.flatten(0, 1)
                yield {k: v.float() for k, v in self.features(x).items()}, y

        return score(probes, batches(), len(self.test), n_crops, self.device, False, sharded=world()[1] > 1)


# ----------------------------------------------------------------------------- fixed statistics, bf16 matmuls


class Moments:
    """Per-feature mean and biased variance, accumulated in float64 over chunks."""

    def __init__(self):
        self.n, self.s, self.ss = 0, {}, {}

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        for k, v in feats.items():
            v = v.double()
            self.s[k] = self.s.get(k, 0) + v.sum(0)
            self.ss[k] = self.ss.get(k, 0) + (v * v).sum(0)
        self.n += len(next(iter(feats.values())))

    def all_sum(self) -> None:
        """Under torchrun: the moments of every rank's part (each rank saw different images)."""
        self.s = {k: all_sum(v) for k, v in self.s.items()}
        self.ss = {k: all_sum(v) for k, v in self.ss.items()}
        self.n = int(all_sum(torch.tensor(float(self.n), dtype=torch.float64)).item())

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for k in self.s:
            mean = self.s[k] / self.n
            var = (self.ss[k] / self.n - mean * mean).clamp_(min=0)
            out[k] = (mean.float(), var.float())
        return out


def cache_stats(cache: dict[str, torch.Tensor], chunk: int = 4096):
    """{tap: (mean, biased variance)} of the cached features, in chunks (no float64 copy of the whole cache)."""
    m = Moments()
    n = len(next(iter(cache.values())))
    for i in range(0, n, chunk):
        m.add({k: v[i:i + chunk] for k, v in cache.items()})
    return m.result()


def standardize_(cache: dict[str, torch.Tensor], stats: dict[str, tuple[torch.Tensor, torch.Tensor]], eps: float,
                 dtype: torch.dtype = torch.float16, chunk: int = 4096) -> None:
    """cache[k] <- (cache[k] - mean) / sqrt(var + eps), i.e. what the fixed BatchNorm computes, stored
    in `dtype` (fp16, or bf16 when the probe's matmuls run in bf16: then the batches need no conversion)."""
    for k, v in cache.items():
        mean, var = stats[k]
        mean, rstd = mean.to(v.device), (var + eps).rsqrt().to(v.device)
        out = v if dtype == v.dtype else torch.empty(v.shape, dtype=dtype, device=v.device)
        for i in range(0, len(v), chunk):
            out[i:i + chunk] = ((v[i:i + chunk].float() - mean) * rstd).to(dtype)
        cache[k] = out


def _fits_on_gpu(n: int, dims: dict[str, int]) -> bool:
    """Whether an fp16 cache of n images fits in 40% of the free GPU memory."""
    try:
        free, _total = torch.cuda.mem_get_info()
    except Exception:  # pragma: no cover
        return False
    return n * sum(dims.values()) * 2 < 0.4 * free


def probe_matmul_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the probes' matmuls on standardised cached features where the hardware does bf16
    (CUDA; CPUs with oneDNN bf16 support, e.g. AVX512-BF16 or AMX); fp32 elsewhere, or everywhere
    when the environment sets MONOSSL_PROBE_BF16=0 (k-NN's similarity matmul follows it too).
    Weights, gradients and the optimiser stay fp32. On this project's 2-core AVX512-BF16 CPU it
    makes probe training about 4x faster per matmul (benchmarks/bench_probe.py); the features are
    fp16-rounded already, and bf16 products change final top-1 by about a tenth of a point (docs/probes.md)."""
    flag = os.environ.get("MONOSSL_PROBE_BF16", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return torch.float32
    if flag not in ("", "1", "true", "yes", "on"):
        raise UserError(f"MONOSSL_PROBE_BF16 must be 0 or 1, not {flag!r}")
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if onednn_bf16() else torch.float32


def matmul_precision(device: torch.device, dtype: torch.dtype):
    """The context the probes' forward runs in: autocast to `dtype`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
