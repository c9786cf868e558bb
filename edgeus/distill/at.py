"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv:1612.03928).

The spatial attention map of a feature map f (N x C x H x W) is ``Q = mean_c |f_c|^p``, flattened
and L2-normalised per sample. The loss, per pair, is the mean squared difference of the student's
and the teacher's normalised maps (as in the authors' code); maps of different spatial sizes are
aligned by average-pooling the larger one (or resizing the student's, ``distill.align=interpolate``).
Channels need not match, so AT needs no adapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from edgeus.distill.base import LossTerm, Outputs, TermInfo, register_loss
from edgeus.distill.fitnet import align_maps


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """N x (H*W), unit L2 norm per sample."""
    q = f.abs().pow(p).mean(dim=1) if p != 2 else f.pow(2).mean(dim=1)
    return F.normalize(q.flatten(1), dim=1)


def at_loss(fs: torch.Tensor, ft: torch.Tensor, p: float = 2.0, align: str = "pool") -> torch.Tensor:
    fs, ft = align_maps(fs, ft, align)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


@register_loss
class AT(LossTerm):
    name = "at"
    needs_features = True

    def __init__(self, cfg, info: TermInfo):
        super().__init__(cfg, info)
        self.p = float(cfg.at_p)
        self.align = str(getattr(cfg, "align", "pool"))

    def forward(self, out: Outputs) -> torch.Tensor:
        total = 0.0
        for fs, ft in zip(out.student_feats, out.teacher_feats):
            total = total + at_loss(fs, ft.detach(), self.p, self.align)
        return total
