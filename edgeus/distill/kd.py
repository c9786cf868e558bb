"""Hinton knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

    L_KD = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )      (mean over the batch)

The T^2 factor keeps the gradient scale independent of T. Combined with cross-entropy by weights
(``distill.weights``), or by Hinton's ``distill.alpha``: ``(1 - alpha) * CE + alpha * L_KD``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeus.distill.base import LossTerm, Outputs, TermInfo, register_loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * t * t


@register_loss
class KD(LossTerm):
    name = "kd"

    def __init__(self, cfg, info: TermInfo):
        super().__init__(cfg, info)
        self.temperature = float(cfg.temperature)
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")

    def forward(self, out: Outputs) -> torch.Tensor:
        return kd_loss(out.student_logits, out.teacher_logits, self.temperature)
