"""Hinton knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

    L_KD = T^2 * KL( softmax(z_t / T) || softmax(z_s / T) )      (mean over the batch)

The T^2 factor keeps the gradient scale independent of T. Combined with cross-entropy by weights
(``distill.weights``), or by Hinton's ``distill.alpha``: ``(1 - alpha) * CE + alpha * L_KD``.

When the data gives class weights (``data.balance=weights``), the batch mean is weighted by each
image's class weight, as the cross-entropy is. Unweighted, the KD term (T^2 = 16 times the scale of
CE at T = 4) pulls a student trained on imbalanced data back toward the majority class: on BUSI a
pruned RSMAS-Net fine-tuned with unweighted KD lost 4 of the teacher's 16 correctly found
malignant test images while gaining benign ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeus.distill.base import LossTerm, Outputs, TermInfo, register_loss


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over the batch, or sum(w * x) / sum(w) (F.cross_entropy's reduction with class weights)."""
    if sample_weight is None:
        return per_sample.mean()
    w = sample_weight.to(per_sample.dtype)
    return (w * per_sample).sum() / w.sum().clamp_min(torch.finfo(per_sample.dtype).tiny)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
            sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return weighted_mean(kl, sample_weight) * t * t


@register_loss
class KD(LossTerm):
    name = "kd"
    class_weighted = True

    def __init__(self, cfg, info: TermInfo):
        super().__init__(cfg, info)
        self.temperature = float(cfg.temperature)
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {self.temperature}")

    def forward(self, out: Outputs) -> torch.Tensor:
        return kd_loss(out.student_logits, out.teacher_logits, self.temperature, self.sample_weight(out))
