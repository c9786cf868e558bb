"""DSC-STA: the lightweight myositis network (Tan et al., J. Biomed. Eng. 2024), a natural student.

The abstract is all that is public: the network alternates depth-wise separable convolutions (DSC)
and conventional convolutions (CConv) and uses soft-threshold attention to keep key features at
0.25 % of a dual-branch network's compute. Our layout:

    stem    3x3 conv, stride 2 (32 * width)
    stage i (channels 32, 64, 128, 256 [, ...] * width):
        DSC     3x3 depth-wise (stride 2) + BN + ReLU, 1x1 point-wise + BN + ReLU
        CConv   3x3 conv + BN
        STA     soft threshold (shrinkage) attention on the CConv output, added back to the DSC output
                (a residual shrinkage unit: y = relu(d + STA(CConv(d))))
    GAP, dropout, linear

``SoftThreshold`` (``edgeus.models.layers``) learns a per-channel threshold from |x| (DRSN-CW): small,
noise-like responses (speckle) are zeroed, larger ones shrunk.

Variants from the review of lightweight CNNs (seed 002), off by default: ``attention="ca"`` adds
coordinate attention on each stage's output (after the shrinkage unit), ``ghost=True`` makes the
point-wise conv and the conventional 3x3 conv Ghost modules (half the channels from the conv, half
from a cheap depth-wise conv over them).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.layers import ConvBNAct, CoordinateAttention, GhostModule, SoftThreshold, make_divisible
from edgeus.models.registry import register_model


class DSCSTABlock(nn.Module):
    """One DSC -> CConv -> soft-threshold stage with a residual over the CConv branch."""

    def __init__(self, inp: int, oup: int, stride: int = 2, sta_reduction: int = 4, attention: str = "none",
                 ghost: bool = False, ca_reduction: int = 32):
        super().__init__()
        self.dw = ConvBNAct(inp, inp, 3, stride, groups=inp)
        self.pw = GhostModule(inp, oup, 1, relu=True) if ghost else ConvBNAct(inp, oup, 1)
        self.conv = GhostModule(oup, oup, 3, relu=False) if ghost else ConvBNAct(oup, oup, 3, act=None)
        self.sta = SoftThreshold(oup, sta_reduction)
        self.relu = nn.ReLU(inplace=True)
        self.attention = CoordinateAttention(oup, ca_reduction) if attention == "ca" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.pw(self.dw(x))
        y = self.relu(d + self.sta(self.conv(d)))
        return y if self.attention is None else self.attention(y)


class DSCSTANet(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0,
                 channels: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.2, sta_reduction: int = 4,
                 attention: str = "none", ghost: bool = False, ca_reduction: int = 32):
        super().__init__()
        if attention not in ("none", "ca"):
            raise ValueError(f"dsc_sta attention must be none | ca, not {attention!r}")
        ch = [make_divisible(c * width, 8) for c in channels]
        stem = make_divisible(32 * width, 8)
        self.stem = ConvBNAct(in_chans, stem, 3, 2)
        blocks, inp = [], stem
        for c in ch:
            blocks.append(DSCSTABlock(inp, c, 2, sta_reduction, attention, bool(ghost), ca_reduction))
            inp = c
        self.blocks = nn.Sequential(*blocks)
        self.num_features = inp
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(inp, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        return self.fc(self.dropout(x))


@register_model
def dsc_sta(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, channels: tuple = (32, 64, 128, 256),
            dropout: float = 0.2, sta_reduction: int = 4, attention: str = "none", ghost: bool = False,
            ca_reduction: int = 32) -> nn.Module:
    """Alternating depth-wise separable / conventional convs with soft-threshold attention
    (``attention=ca``: plus coordinate attention per stage; ``ghost=true``: Ghost modules for the convs)."""
    return DSCSTANet(num_classes, in_chans, width, tuple(int(c) for c in channels), dropout, sta_reduction,
                     attention, bool(ghost), ca_reduction)
