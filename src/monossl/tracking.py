"""Where a run's numbers go besides metrics.jsonl: TensorBoard, and Weights & Biases when asked.

The training loop (train.py) hands every record it appends to metrics.jsonl to a `Tracker`:

* a training record (no "event"): each number under `train/<key>` (loss terms, lr, images_per_s);
* an evaluator's or an epoch's event: `<event>/<key>`, and `<event>/<key>/<name>` for a dict of
  numbers (`probe/top1/conv1`, `student/top1`, `epoch_start/k`);
* at the end of a finished run, conv1's filters as one image, `filters/conv1`.

TensorBoard event files are written into the run directory itself, so `tensorboard --logdir runs/`
shows every run below `runs/`. They are written when the `tensorboard` package is importable (the
`tensorboard` extra), else the run goes on without them. A resumed run opens its writer with
`purge_step` at the step it resumes from: TensorBoard then drops the points an interrupted run wrote
after its checkpoint, so no step appears twice (the loop drops the same lines from metrics.jsonl).

Weights & Biases (`pretrain --wandb PROJECT`) gets the same numbers; it is imported only when asked,
and a missing `wandb` is a one-line UserError before anything runs. The run's id is kept in the run
directory (wandb-id) so that a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib
import logging
import math
import uuid
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torchvision.utils import make_grid

from monossl.distributed import is_main
from monossl.errors import UserError
from monossl.models.trunks import Trunk

if TYPE_CHECKING:  # the tensorboard package is optional: imported where a writer is opened
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb-id"


def scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record -> {tag: value} of its finite numbers (the step is the x axis, not a tag)."""
    prefix = record.get("event", "train")
    out = {}
    for key, value in record.items():
        if key in ("step", "event"):
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for name, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
                out[f"{prefix}/{key}" if name is None else f"{prefix}/{key}/{name}"] = float(number)
    return out


@torch.no_grad()
def conv1_filter_grid(trunk: Trunk, scale: int = 4) -> torch.Tensor:
    """conv1's filters (the effective weight, U Z for a whitened conv1) tiled into one (3, H, W) image in
    [0, 1], each filter min-max normalised on its own; a conv1 that does not read RGB (a Sobel trunk's
    two gradient channels) is drawn in grey as its channels' sum. viz/filters.py draws the careful
    version (BatchNorm folded in, Sobel composed); this one is a quick look during training."""
    weight = trunk.conv1.weight.detach().float().cpu()
    if weight.shape[1] != 3:
        weight = weight.sum(1, keepdim=True)
    weight = torch.nn.functional.interpolate(weight, scale_factor=scale, mode="nearest")
    columns = math.ceil(math.sqrt(weight.shape[0]))
    return make_grid(weight, nrow=columns, padding=1, normalize=True, scale_each=True, pad_value=1.0)


def import_wandb() -> ModuleType:
    """The wandb module, or a one-line UserError when it is not installed."""
    try:
        return importlib.import_module("wandb")
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb") from None


class Tracker:
    """TensorBoard (when installed) and W&B (when `wandb_project` is given) for one run directory.

    `start(step)` opens the writers where the loop starts (0, or the step it resumes from); `log(record)`
    takes metrics.jsonl records; `image(tag, chw, step)`; `close()`. Only the main process writes."""

    def __init__(self, run_dir: str | Path, wandb_project: str | None = None, run_config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.wandb = import_wandb() if wandb_project else None  # refused before the run starts
        self.wandb_project, self.run_config = wandb_project, run_config or {}
        self.board: SummaryWriter | None = None
        self.wandb_run: Any = None  # a wandb Run (wandb is optional and untyped here)

    def start(self, step: int) -> None:
        if not is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            log.info("tensorboard is not installed: no TensorBoard event files (pip install tensorboard)")
        else:
            # purge_step: points an interrupted run wrote at or after `step` are dropped when read
            self.board = SummaryWriter(log_dir=str(self.run_dir), purge_step=step)
            log.debug("TensorBoard event files in %s (from step %d)", self.run_dir, step)
        if self.wandb is not None:
            self.wandb_run = self.wandb.init(project=self.wandb_project, dir=str(self.run_dir),
                                             name=self.run_dir.name, config=self.run_config,
                                             id=self._wandb_id(), resume="allow")

    def _wandb_id(self) -> str:
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:12]
        path.write_text(run_id + "\n")
        return run_id

    def log(self, record: dict) -> None:
        numbers = scalars(record)
        step = int(record.get("step", 0))
        if self.board is not None:
            for tag, value in numbers.items():
                self.board.add_scalar(tag, value, step)
        if self.wandb_run is not None and numbers:
            self.wandb_run.log(numbers, step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A (3, H, W) image in [0, 1]."""
        if self.board is not None:
            self.board.add_image(tag, image, step)
        if self.wandb is not None and self.wandb_run is not None:  # a W&B run is opened only with wandb
            self.wandb_run.log({tag: self.wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.board = self.wandb_run = None
