"""Losses of the contrastive methods, each a plain function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, all_z1: torch.Tensor | None = None,
            all_z2: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2B embeddings (z1[i] and z2[i] are two views of image i),
    cross-entropy of picking its other view among every other embedding of the batch, with cosine
    similarities divided by `temperature`; mean over the 2B.

    Under data parallelism z1, z2 are this rank's B pairs and all_z1, all_z2 every rank's (gathered,
    this rank's rows starting at `offset`): the candidates are the whole global batch, as one process."""
    all_z1 = z1 if all_z1 is None else all_z1
    all_z2 = z2 if all_z2 is None else all_z2
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    candidates = F.normalize(torch.cat([all_z1, all_z2]).float(), dim=1)
    b, n = z1.shape[0], all_z1.shape[0]
    sim = anchors @ candidates.t() / temperature
    own = torch.arange(b, device=sim.device) + offset
    itself = torch.cat([own, own + n])  # an embedding is not its own positive or negative
    mask = torch.zeros_like(sim, dtype=torch.bool)
    mask[torch.arange(2 * b, device=sim.device), itself] = True
    sim = sim.masked_fill(mask, float("-inf"))
    target = torch.cat([own + n, own])
    return F.cross_entropy(sim, target)


def distillation_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al., 2015): KL(targets || softmax(student / T)) times T^2
    (so gradients keep their size as T changes), mean over the batch. `target_probs` are the
    teacher's softened outputs, softmax(teacher / T), possibly mixed (CutMix)."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, target_probs.float(), reduction="batchmean") * temperature**2


def moco_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE: for each unit-length query, cross-entropy of picking its own key (positive)
    among it and the queue's keys (negatives), similarities divided by `temperature`."""
    positive = (q * k).sum(1, keepdim=True)
    negatives = q @ queue.t()
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """DINO's self-distillation: the teacher's outputs of the global crops, centred and sharpened
    (softmax((t - center) / teacher_temp)), as targets for the student's outputs of every *other*
    crop (cross-entropy with softmax(s / student_temp)), averaged over the pairs."""
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=1) for s in student]
    total, pairs = torch.zeros((), device=center.device), 0
    for i, target in enumerate(targets):
        for j, log_p in enumerate(log_probs):
            if i == j:  # a global crop is not its own target
                continue
            total = total + (-target * log_p).sum(1).mean()
            pairs += 1
    return total / pairs
