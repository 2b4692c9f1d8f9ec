"""The one training loop, for every method.

It knows nothing about methods beyond `method.step(batch, step)` and the hooks of
`methods.base.Method` (no-ops unless a method overrides them). It owns: the device and numerics (bf16 autocast and
channels-last on CUDA), which sample indices each step uses, seeding, the progress bar,
metrics.jsonl (and the same numbers to TensorBoard/W&B: tracking.py), atomic checkpoints, resume, and
distributed data parallelism.

Reproducibility: before step s the global torch RNG is seeded from (seed, s), and the
step's indices depend on (seed, s) only, so a run resumed from any checkpoint on CPU
reaches the same weights as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from monossl import runs
from monossl.device import autocast, memory_format
from monossl.distributed import all_mean, is_main, world
from monossl.errors import TrainingStopped, UserError, first_line
from monossl.methods.base import Method
from monossl.seeds import derive_seed
from monossl.tracking import Tracker, conv1_filter_grid

if TYPE_CHECKING:  # the data package is imported where a run builds its source
    from monossl.data.batches import Source

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    total_steps: int
    batch_size: int
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    stop_after: int | None = None  # stop (checkpointed) once this many steps are done; for tests/debugging


class Evaluator(Protocol):
    """What `train` calls every `every` steps (eval.curves.CurveProbe, eval.accuracy.StudentEval): see `train`."""

    @property
    def every(self) -> int: ...

    @property
    def event(self) -> str: ...

    def __call__(self, method: Method) -> dict: ...

    def summary(self, record: dict) -> str: ...

    def describe(self) -> dict: ...


def steps_per_epoch(source: Source, batch_size: int) -> int | None:
    if source.length is None:
        return None
    if source.length < batch_size:
        raise UserError(f"the training set has {source.length} samples, fewer than --batch-size {batch_size}")
    return source.length // batch_size  # drop the last partial batch: every step has the same size


def train(method: Method, source: Source, loop: LoopConfig, run_dir: str | Path, device: torch.device,
          progress: bool | None = None, evaluators: Sequence[Evaluator] = (), tracker: Tracker | None = None) -> dict:
    """Train `method` on `source` for `loop.total_steps` steps, resuming from run_dir/last.pt if present.

    evaluators: objects with `every` (N), `event` (a name), `__call__(method) -> dict` and
    `summary(record) -> str` (eval.curves.CurveProbe, eval.student.StudentEval), each called after
    0, N, 2N, ... steps and after the last step; each result is logged as an {"event": event} line
    of metrics.jsonl (and its summary as a log line). They must not change the method or the global RNG.

    tracker: where every metrics.jsonl record also goes (tracking.Tracker; default: TensorBoard in
    run_dir when tensorboard is installed), with conv1's filters at the end of a finished run.

    Returns {"step": steps done, "finished": bool, "metrics": last logged record}.
    """
    rank, world_size = world()
    if loop.batch_size % world_size:
        raise UserError(f"--batch-size {loop.batch_size} must be a multiple of the number of processes ({world_size})")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    method.to(device)
    method.to(memory_format=memory_format(device))
    if world_size > 1:
        # every rank starts from rank 0's weights
        for tensor in method.state_dict().values():
            dist.broadcast(tensor, 0)

    spe = steps_per_epoch(source, loop.batch_size)
    start_step, order, restart_records = 0, None, []
    ckpt_path = run_dir / "last.pt"
    if ckpt_path.exists():
        ckpt = runs.load_torch(ckpt_path, "training checkpoint")
        if not isinstance(ckpt, dict) or not {"step", "training"} <= ckpt.keys():
            raise UserError(f"{ckpt_path} is not a monossl training checkpoint (no step and training state)")
        try:
            method.load_training_state(ckpt["training"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # another method's or model's state
            raise UserError(f"{ckpt_path} does not fit this run ({first_line(exc)})") from None
        method.to(device)
        start_step, order = ckpt["step"], ckpt.get("order")
        if is_main():
            # drop log lines written after that checkpoint: they will be written again
            kept = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl")
                    if r.get("step", 0) < start_step or (r.get("step") == start_step and "event" not in r)]
            runs.write_jsonl(run_dir / "metrics.jsonl", kept)
            restart_records = [r for r in kept if r.get("step") == start_step]
        log.info("resuming %s at step %d of %d", run_dir, start_step, loop.total_steps)

    tracker = tracker or Tracker(run_dir)
    # the tracker drops what it holds from start_step on: the kept records of that step go in again
    tracker.start(start_step)
    for record in restart_records:
        tracker.log(record)

    end_step = loop.total_steps if loop.stop_after is None else min(loop.total_steps, loop.stop_after)
    show = (sys.stderr.isatty() if progress is None else progress) and is_main()
    bar = tqdm(total=loop.total_steps, initial=start_step, disable=not show, desc=method.name,
               unit="step", dynamic_ncols=True)
    pending: dict[str, list[float]] = {}
    images_seen, t_log = 0, time.perf_counter()
    last_record = {}

    def write_record(record: dict) -> None:
        if is_main():
            runs.append_jsonl(run_dir / "metrics.jsonl", record)
            tracker.log(record)

    def log_evaluation(evaluator: Evaluator, step_done: int) -> None:
        record = {"step": step_done, "event": evaluator.event, **evaluator(method)}
        write_record(record)
        if is_main():
            log.info(f"step {step_done}: {evaluator.event} " + evaluator.summary(record))

    def save(step_done: int) -> None:
        if is_main():
            runs.save_torch(ckpt_path, {"step": step_done, "order": order, "training": method.training_state()})

    try:
        method.train()
        for step in range(start_step, end_step):
            for evaluator in evaluators:  # after `step` steps; redone on resume (its log line was dropped)
                if step % evaluator.every == 0:
                    log_evaluation(evaluator, step)
            epoch = step // spe if spe else 0
            if spe is not None and step % spe == 0:
                # an epoch starts: the method may choose its order (DeepCluster's sampler), else a shuffle
                started = method.begin_epoch(epoch, source) or {}
                order = started.get("order")
                order = source.order(epoch) if order is None else order
                if started.get("log"):
                    write_record({"step": step, "epoch": epoch, "event": "epoch_start", **started["log"]})
                method.train()
            if spe is None:
                indices = torch.arange(step * loop.batch_size, (step + 1) * loop.batch_size)
            else:
                pos = (step % spe) * loop.batch_size
                assert order is not None  # drawn at the epoch's start, or restored from the checkpoint
                indices = order[pos:pos + loop.batch_size]
            indices = indices[rank::world_size]
            batch = source.fetch(indices)
            if device.type == "cuda":  # pinned host memory lets the copy overlap with queued GPU work
                batch = {k: (v.pin_memory() if torch.is_tensor(v) and v.device.type == "cpu" else v)
                         for k, v in batch.items()}
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if "images" in batch:
                batch["images"] = batch["images"].contiguous(memory_format=memory_format(device))

            # the same seed on every rank: random draws are made for the global batch (distributed.py)
            torch.manual_seed(derive_seed(loop.seed, 0, step))
            with autocast(device):
                metrics = method.step(batch, step)
            for k, v in metrics.items():
                if not math.isfinite(v):  # checkpoints are only written after finite steps: last.pt is good
                    raise TrainingStopped(f"training stopped: {k} became {v} at step {step}; "
                                          f"the last good checkpoint is {ckpt_path}")
                pending.setdefault(k, []).append(v)
            images_seen += batch["images"].shape[0] * world_size
            bar.update(1)

            done = step + 1
            if done % loop.log_every == 0 or done == end_step:
                now = time.perf_counter()
                means = all_mean({k: sum(v) / len(v) for k, v in pending.items()})  # over ranks: the global batch's
                last_record = {"step": done, "epoch": epoch, **means,
                               "images_per_s": images_seen / max(now - t_log, 1e-9)}
                pending, images_seen, t_log = {}, 0, now
                write_record(last_record)
                if is_main():
                    log.debug("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
                bar.set_postfix({k: f"{v:.3g}" for k, v in last_record.items() if k in ("loss", "images_per_s")})
            if spe is not None and done % spe == 0 and is_main():
                method.end_epoch(epoch, run_dir)
            if is_main():
                method.after_step(done, run_dir)
            if done % loop.checkpoint_every == 0 or done == end_step:
                save(done)
        if end_step >= loop.total_steps:
            for evaluator in evaluators:
                log_evaluation(evaluator, loop.total_steps)
            if is_main():
                tracker.image("filters/conv1", conv1_filter_grid(method.published_trunk()), loop.total_steps)
    finally:  # also when stopped or interrupted: the bar's line ends, the event files are flushed
        bar.close()
        tracker.close()
    return {"step": max(end_step, start_step), "finished": end_step >= loop.total_steps, "metrics": last_record}
