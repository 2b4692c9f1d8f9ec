"""A trunk with its class head: what a supervised run (or a distilled student) can be used as.

`classifier.pt` sits beside a run's trunk.pt (a plain `torch.save`d dict, loadable with plain
torch): {"format": "monossl.classifier/1", "head": Linear state_dict, "num_classes": K,
"meta": {...}}. `load_classifier(run)` rebuilds trunk + head as one module that maps images in
[0, 1] (the trunk normalises them) to class logits.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from monossl.errors import UserError, first_line

CLASSIFIER_FORMAT = "monossl.classifier/1"


class Classifier(nn.Module):
    """trunk -> pooled features -> linear head: images in [0, 1] to class logits."""

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.num_classes = head.out_features
        self.input_size = trunk.input_size

    def forward(self, images: torch.Tensor):
        return self.head(self.trunk(images))


def save_classifier(path: str | Path, head: nn.Linear, meta: dict | None = None) -> None:
    from monossl.runs import save_torch

    save_torch(path, {"format": CLASSIFIER_FORMAT, "num_classes": head.out_features,
                      "head": {k: v.detach().cpu() for k, v in head.state_dict().items()}, "meta": dict(meta or {})})


def load_classifier(run: str | Path) -> tuple[Classifier, dict]:
    """A run directory holding trunk.pt and classifier.pt (a supervised run) -> (Classifier, meta)."""
    from monossl.models import load_trunk
    from monossl.runs import load_torch

    run = Path(run)
    path = run / "classifier.pt"
    if not path.is_file():
        raise UserError(f"{run} holds no classifier.pt: a teacher is a finished `monossl pretrain --method "
                        "supervised` run (or torchvision:ARCH:WEIGHTS.pth)")
    ckpt = load_torch(path, "classifier checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CLASSIFIER_FORMAT or not isinstance(ckpt.get("head"), dict):
        raise UserError(f"{path} is not a monossl classifier checkpoint (format {CLASSIFIER_FORMAT})")
    trunk, meta = load_trunk(run)
    head = nn.Linear(trunk.feature_dim, int(ckpt.get("num_classes", 0)) or 1)
    try:
        head.load_state_dict(ckpt["head"])
    except RuntimeError as exc:
        raise UserError(f"{path}: the head does not fit the trunk in {run} ({first_line(exc)})") from None
    return Classifier(trunk, head), {**meta, **ckpt.get("meta", {})}
