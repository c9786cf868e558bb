"""FitNets hints (Romero et al., ICLR 2015, arXiv:1412.6550).

For each ``[teacher_module, student_module]`` pair a learnable adapter (1x1 conv + BatchNorm)
maps the student's channels to the teacher's; the loss is the mean squared error between the
adapted student map and the teacher map. Spatial sizes are aligned first (``distill.align``):

* ``pool`` (default): the larger map is average-pooled to the smaller one's size;
* ``interpolate``: the student map is resized (bilinear) to the teacher's size.

The adapters are submodules of the distiller, so their parameters reach the optimiser through
``distiller.parameters()``; they are not part of the student and are dropped with the distiller.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.distill.base import LossTerm, Outputs, TermInfo, register_loss
from edgeus.errors import EdgeusError

ALIGN = ("pool", "interpolate")


def align_maps(fs: torch.Tensor, ft: torch.Tensor, mode: str = "pool") -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two N x C x H x W maps to one spatial size."""
    hs, ht = tuple(fs.shape[-2:]), tuple(ft.shape[-2:])
    if hs == ht:
        return fs, ft
    if mode == "interpolate":
        return F.interpolate(fs, size=ht, mode="bilinear", align_corners=False), ft
    size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
    if hs != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if ht != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return fs, ft


def make_adapter(student_channels: int, teacher_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                         nn.BatchNorm2d(teacher_channels))


@register_loss
class FitNet(LossTerm):
    name = "fitnet"
    needs_features = True

    def __init__(self, cfg, info: TermInfo):
        super().__init__(cfg, info)
        self.align = str(getattr(cfg, "align", "pool"))
        if self.align not in ALIGN:
            raise EdgeusError(f"distill.align={self.align!r}; use one of {', '.join(ALIGN)}")
        if not info.pairs:
            raise EdgeusError("fitnet needs feature pairs (distill.pairs) and none were resolved")
        self.adapters = nn.ModuleList(
            make_adapter(p.student_shape[0], p.teacher_shape[0]) for p in info.pairs)

    def forward(self, out: Outputs) -> torch.Tensor:
        total = 0.0
        for adapter, fs, ft in zip(self.adapters, out.student_feats, out.teacher_feats):
            fs, ft = align_maps(adapter(fs), ft.detach(), self.align)
            total = total + F.mse_loss(fs, ft)
        return total
