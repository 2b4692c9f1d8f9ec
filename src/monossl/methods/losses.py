"""Losses of the contrastive methods, each a plain function of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent: for each of the 2B embeddings, cross-entropy of picking its other view
    among the 2B - 1 others, with cosine similarities divided by `temperature`; mean over 2B."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    b = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # an embedding is not its own positive or negative
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
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
    total, pairs = 0.0, 0
    for i, target in enumerate(targets):
        for j, log_p in enumerate(log_probs):
            if i == j:  # a global crop is not its own target
                continue
            total = total + (-target * log_p).sum(1).mean()
            pairs += 1
    return total / pairs
