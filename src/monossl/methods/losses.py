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
