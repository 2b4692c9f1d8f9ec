"""Data parallelism through `torchrun` (PyTorch DDP), for every command that trains or extracts.

    torchrun --nproc_per_node 8 -m monossl.cli pretrain --method rotnet --arch alexnet-big ...

`setup(device)` joins the process group when torchrun started us (it sets WORLD_SIZE): NCCL on
CUDA, each rank on GPU LOCAL_RANK; gloo on CPU (what the test suite uses). The rest of the code
asks `world()` and `is_main()`; only rank 0 writes files.

How the pieces stay equal to one process with the same global batch (tested on 2 CPU processes):
  * the loop gives rank r the samples r, r + W, r + 2W, ... of each global batch;
  * every random draw of a step is made for the whole global batch on every rank (same seed) and
    each rank keeps its rows (`local_rows`), so a sample gets the same crop in any world size;
  * every trained module runs through PyTorch's `DistributedDataParallel` (`data_parallel`: bucketed
    all-reduces of the gradients, overlapped with the backward pass); momentum/teacher networks are
    not wrapped (they take no gradient and are updated identically on every rank);
  * losses that compare samples across the batch (SimCLR's negatives) see the whole global batch
    through `all_gather_with_grad`;
  * with `--sync-bn`, BatchNorm uses the statistics of the global batch (`sync_batchnorm`).
Without --sync-bn each rank normalises with its own part of the batch, as plain DDP does.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import FunctionCtx
from torch.nn.modules.batchnorm import _BatchNorm

from monossl.errors import UserError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if there is one; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise UserError("WORLD_SIZE is set (torchrun?) but this torch build has no torch.distributed")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but torch sees {torch.cuda.device_count()} GPU(s); "
                            "give torchrun --nproc_per_node at most the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # DeepCluster's clustering runs on rank 0 while the others wait: allow long epochs
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    return device


def collective_device() -> torch.device:
    """Where tensors must live for collectives: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a tensor drawn for the whole global batch (rows rank, rank + W, ...)."""
    rank, size = world()
    return t[rank::size] if size > 1 else t


def global_rows(local: torch.Tensor) -> torch.Tensor:
    """The inverse of `local_rows` on every rank: the whole global batch, in its own order
    (MoCo's queue and DINO's centre take every rank's samples)."""
    size = world()[1]
    if size == 1:
        return local
    blocks = gather_rows(local, len(local) * size)  # rank r's rows are the r-th block
    return blocks.view(size, len(local), *local.shape[1:]).transpose(0, 1).flatten(0, 1)


def global_count(local: int) -> int:
    """How many rows to draw so that `local_rows` leaves `local` for this rank."""
    return local * world()[1]


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """rank `src`'s tensor on every rank (a no-op when not distributed); returns it on t's device."""
    if world()[1] == 1:
        return t
    moved = t.to(collective_device())
    dist.broadcast(moved, src)
    return moved.to(t.device)


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (the same keys on every rank)."""
    if world()[1] == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    t /= world()[1]
    return dict(zip(keys, t.tolist()))


def data_parallel(module: nn.Module) -> nn.Module:
    """`module` under torch's DistributedDataParallel when distributed (gloo on CPU, NCCL on CUDA), else
    `module` itself. Buffers are not synchronised from rank 0 at each forward: with `--sync-bn` the ranks'
    BatchNorm statistics are equal already, and without it each rank keeps its own, as before."""
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   forward_sync_buffers=False)


class _AllGather(torch.autograd.Function):
    """Every rank's rows, rank 0's first; the backward pass gives each rank the gradient of the sum of
    the ranks' losses with respect to its own rows (as SimCLR's and solo-learn's gather layers do)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(x) for _ in range(world()[1])]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rank, size = world()
        return grad.chunk(size)[rank]


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """The ranks' row blocks concatenated (rank r's rows are the r-th block), differentiable; `local`
    itself when not distributed. Every rank must pass the same number of rows."""
    if world()[1] == 1:
        return local
    return _AllGather.apply(local)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor, returned on its device (a no-op when not distributed)."""
    if world()[1] == 1:
        return t
    moved = t.to(collective_device())
    dist.all_reduce(moved)
    return moved.to(t.device)


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate the ranks' row blocks (rank 0's first) into `total` rows, on every rank.

    Rank r holds rows [r * per, (r + 1) * per) of the result, per = ceil(total / W) (the last
    rank may hold fewer): what `shard_range` hands out.
    """
    size = world()[1]
    if size == 1:
        return local
    per = -(-total // size)
    # gloo has no 16-bit all_gather: send those as float32 (exact) there
    wire = torch.float32 if dist.get_backend() == "gloo" and local.element_size() == 2 else local.dtype
    padded = torch.zeros((per, *local.shape[1:]), dtype=wire, device=collective_device())
    padded[:local.shape[0]] = local.to(padded.device, wire)
    out = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(out, padded)
    return torch.cat(out)[:total].to(local.device, local.dtype)


def shard_range(total: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of `total` items this rank handles (see gather_rows)."""
    rank, size = world()
    per = -(-total // size)
    return min(rank * per, total), min((rank + 1) * per, total)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of each rank's input is the sum of the
    ranks' output gradients (torch.distributed.nn's version of this is deprecated)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class _GlobalBatchNorm(_BatchNorm):
    """BatchNorm with the batch statistics of all ranks, on any device (mixed into BatchNorm1d/2d).

    torch.nn.SyncBatchNorm runs on GPUs only; this is the same computation for CPU (gloo),
    through a differentiable all-reduce of the sums, so the gradients are those of BatchNorm over
    the global batch. Same parameters and buffers as the plain layer: its checkpoints load into it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every dimension but the channels'
        n_local = x.numel() // x.shape[1]
        stats = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), x.new_full((1,), float(n_local))])
        stats = _AllReduceSum.apply(stats)
        c = x.shape[1]
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_(min=0)
        with torch.no_grad():
            if self.track_running_stats:  # then the layer has its running statistics and batch count
                assert self.num_batches_tracked is not None
                assert self.running_mean is not None and self.running_var is not None
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)  # unbiased, as BatchNorm
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _GlobalBatchNorm1d(_GlobalBatchNorm, nn.BatchNorm1d):
    pass


class _GlobalBatchNorm2d(_GlobalBatchNorm, nn.BatchNorm2d):
    pass


_GLOBAL: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: _GlobalBatchNorm1d, nn.BatchNorm2d: _GlobalBatchNorm2d}


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm1d/2d use global-batch statistics: torch's SyncBatchNorm on CUDA, ours elsewhere.

    The layers keep their Parameter objects (ours changes the class in place; torch's conversion moves
    the same Parameters into its new layers), so optimisers built before the call still train them."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for child in module.modules():
        if type(child) in _GLOBAL:
            child.__class__ = _GLOBAL[type(child)]
    return module
