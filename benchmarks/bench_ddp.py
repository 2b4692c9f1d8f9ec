"""Two-process training on gloo: PyTorch's DistributedDataParallel against the per-parameter all-reduce
it replaced, samples per second of each in the same run.

    python benchmarks/bench_ddp.py                              # cifar and alexnet-small, about 3 minutes
    python benchmarks/bench_ddp.py --archs cifar --rounds 5 --batch 64

Both paths train the same method (the supervised baseline: a trunk plus a linear head, SGD) on the
same random batches in two processes of one thread each:

- `ddp`: the method as it ships (`Method.parallel`: DistributedDataParallel, gradients bucketed and
  all-reduced while the backward pass runs);
- `per-parameter`: the trunk and head unwrapped, and after the backward pass each parameter's gradient
  all-reduced on its own and divided by the world size (what `distributed.average_gradients` did
  before DDP; kept here only as the baseline).

The two paths take turns within each round (a busy machine slows both alike); each one's time is its
median over rounds. The target: DDP not slower on either trunk (ratio >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from monossl.methods.supervised import Supervised
from monossl.models import build_trunk

TARGET = 1.0


class PerParameterAllReduce(Supervised):
    """The pre-DDP path: modules run unwrapped; after the backward pass every gradient is all-reduced
    by itself (one collective per parameter, after the whole backward pass) and averaged."""

    def parallel(self, *modules: nn.Module) -> nn.Module:
        return modules[0] if len(modules) == 1 else nn.Sequential(*modules)

    def before_update(self, step: int) -> None:
        world_size = dist.get_world_size()
        for p in self.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)


def _worker(rank: int, world_size: int, port: int, args: argparse.Namespace, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for arch in args.archs:
            torch.manual_seed(0)
            trunk = build_trunk(arch)
            size = trunk.input_size
            methods = {"ddp": Supervised(trunk, total_steps=10**6),
                       "per-parameter": PerParameterAllReduce(build_trunk(arch), total_steps=10**6)}
            methods["per-parameter"].load_state_dict(methods["ddp"].state_dict())
            generator = torch.Generator().manual_seed(rank)
            batch = {"images": torch.rand(args.batch, 3, size, size, generator=generator),
                     "labels": torch.randint(0, 10, (args.batch,), generator=generator)}
            for method in methods.values():  # warm-up: DDP's first step builds its buckets
                for step in range(args.warmup):
                    method.step(batch, step)
            times: dict[str, list[float]] = {name: [] for name in methods}
            for _ in range(args.rounds):
                for name, method in methods.items():
                    dist.barrier()
                    t0 = time.perf_counter()
                    for step in range(args.steps):
                        method.step(batch, step)
                    dist.barrier()
                    times[name].append(time.perf_counter() - t0)
            if rank == 0:
                n_params = sum(p.numel() for p in methods["ddp"].parameters())
                results[arch] = {name: world_size * args.batch * args.steps / statistics.median(t)
                                 for name, t in times.items()} | {"params": n_params, "tensors": len(list(
                                     methods["ddp"].parameters()))}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", type=lambda s: s.split(","), default=["cifar", "alexnet-small"])
    parser.add_argument("--batch", type=int, default=32, help="images per process per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(args.processes, _free_port(), args, results), nprocs=args.processes)
    print(f"{args.processes} processes x {args.threads} thread(s), gloo, {args.batch} images per process per step, "
          f"median of {args.rounds} rounds of {args.steps} steps; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'trunk':<15}{'parameters':>12}{'tensors':>9}{'per-parameter':>16}{'ddp':>12}{'ddp / per-param':>17}")
    worst = float("inf")
    for arch, r in results.items():
        ratio = r["ddp"] / r["per-parameter"]
        worst = min(worst, ratio)
        print(f"{arch:<15}{r['params']:>12,}{r['tensors']:>9}{r['per-parameter']:>12.1f} s/s{r['ddp']:>8.1f} s/s"
              f"{ratio:>16.2f}x")
    print(f"target: ddp / per-parameter >= {TARGET:.1f} on every trunk: {'met' if worst >= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
