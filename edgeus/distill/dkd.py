"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv:2203.08679).

With p = softmax(z / T) for the teacher (t) and the student (s), and g the label:

* TCKD, target-class KD: the binary KL between b = [p_g, 1 - p_g] of teacher and student;
* NCKD, non-target-class KD: the KL between the distributions over the non-target classes,
  each renormalised (p_i / (1 - p_g), i != g);

    L_DKD = T^2 * (alpha * TCKD + beta * NCKD)

Classical KD decomposes as KL(p_t || p_s) = TCKD + (1 - p_t,g) * NCKD; DKD frees the two weights.
All terms are computed in log space (``log(1 - p_g) = logsumexp(z_non-target) - logsumexp(z)``),
so a confident teacher gives no NaN. ``distill.dkd_warmup`` ramps the DKD weight linearly from 0 to
1 over that many epochs (mdistiller uses 20 of 240).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeus.distill.base import LossTerm, Outputs, TermInfo, register_loss
from edgeus.distill.kd import weighted_mean


def _binary_log_probs(z: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    lse_all = torch.logsumexp(z, dim=1)
    log_p_gt = (z * gt_mask).sum(1) - lse_all
    log_rest = torch.logsumexp(z.masked_fill(gt_mask, float("-inf")), dim=1) - lse_all
    return torch.stack([log_p_gt, log_rest], dim=1)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float, sample_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), batch means (weighted by ``sample_weight`` when given), *without* the T^2 factor."""
    t = float(temperature)
    zs, zt = student_logits / t, teacher_logits / t
    gt = F.one_hot(labels.long(), zs.shape[1]).bool()
    # target-class term: KL between the binary distributions
    bs, bt = _binary_log_probs(zs, gt), _binary_log_probs(zt, gt)
    tckd = weighted_mean((bt.exp() * (bt - bs)).sum(1), sample_weight)
    # non-target term: KL between the renormalised non-target distributions
    ls = F.log_softmax(zs.masked_fill(gt, float("-inf")), dim=1)
    lt = F.log_softmax(zt.masked_fill(gt, float("-inf")), dim=1)
    zero = torch.zeros((), dtype=zs.dtype, device=zs.device)
    ls, lt = torch.where(gt, zero, ls), torch.where(gt, zero, lt)
    nckd = weighted_mean((lt.exp().masked_fill(gt, 0.0) * (lt - ls)).sum(1), sample_weight)
    return tckd, nckd


def dkd_loss(student_logits, teacher_logits, labels, alpha: float, beta: float, temperature: float,
             sample_weight: torch.Tensor | None = None):
    tckd, nckd = dkd_terms(student_logits, teacher_logits, labels, temperature, sample_weight)
    return (alpha * tckd + beta * nckd) * float(temperature) ** 2


@register_loss
class DKD(LossTerm):
    name = "dkd"
    class_weighted = True   # as in KD: the batch mean is class-weighted like the cross-entropy

    def __init__(self, cfg, info: TermInfo):
        super().__init__(cfg, info)
        self.alpha = float(cfg.dkd_alpha)
        self.beta = float(cfg.dkd_beta)
        self.temperature = float(cfg.temperature)
        self.warmup = float(cfg.dkd_warmup or 0.0)
        if info.num_classes < 3:
            # with two classes there is one non-target class: NCKD is identically zero
            self.note = "NCKD is zero with 2 classes; DKD reduces to alpha * TCKD"

    def ramp(self, epoch: float | None) -> float:
        if self.warmup <= 0 or epoch is None:
            return 1.0
        return min(1.0, max(0.0, epoch) / self.warmup)

    def forward(self, out: Outputs) -> torch.Tensor:
        loss = dkd_loss(out.student_logits, out.teacher_logits, out.labels,
                        self.alpha, self.beta, self.temperature, self.sample_weight(out))
        return self.ramp(out.epoch) * loss
