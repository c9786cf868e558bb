"""MobileNetV2 (Sandler et al., 2018), a standard lightweight student.

Module tree and key names follow torchvision's ``mobilenet_v2`` (``features.N...``,
``classifier.1``), so a torchvision checkpoint file loads with ``model.pretrained=<path>``.
``width`` is torchvision's ``width_mult`` (channels rounded to multiples of 8; the last 1x1 conv has
``1280 * max(1, width)`` channels as in torchvision).

Variants from the review of lightweight CNNs (seed 002), off by default (the default model is
torchvision's, unchanged): ``attention="ca"`` puts coordinate attention after every block's
depth-wise conv (where Hou et al. put it in MobileNetV2; torchvision's keys stay as they are, the
attention modules are extra ``features.N.attention`` keys), ``ghost=True`` makes the 1x1 expansion
and projection convs Ghost modules (``edgeus.models.layers.GhostModule``; their keys are not
torchvision's).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.layers import ConvBNAct, CoordinateAttention, GhostModule, make_divisible
from edgeus.models.registry import register_model

# expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand (t > 1), 3x3 depth-wise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, attention: str = "none",
                 ghost: bool = False, ca_reduction: int = 32):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(GhostModule(inp, hidden, 1, relu=True) if ghost else ConvBNAct(inp, hidden, 1, act=nn.ReLU6))
        layers.append(ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6))
        self.dw_index = len(layers) - 1
        if ghost:
            layers.append(GhostModule(hidden, oup, 1, relu=False))
        else:
            layers += [nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        # outside self.conv, so that torchvision's conv.N indices (and a checkpoint's keys) stay the same
        self.attention = CoordinateAttention(hidden, ca_reduction) if attention == "ca" else None
        self.out_channels = oup

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.attention is None:
            return self.conv(x)
        for i, m in enumerate(self.conv):
            x = m(x)
            if i == self.dw_index:
                x = self.attention(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x) if self.use_res_connect else self.branch(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2,
                 attention: str = "none", ghost: bool = False, ca_reduction: int = 32):
        super().__init__()
        if attention not in ("none", "ca"):
            raise ValueError(f"mobilenetv2 attention must be none | ca, not {attention!r}")
        inp = make_divisible(32 * width, 8)
        self.last_channel = make_divisible(1280 * max(1.0, width), 8)
        features: list[nn.Module] = [ConvBNAct(in_chans, inp, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width, 8)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t, attention, bool(ghost), ca_reduction))
                inp = out
        features.append(ConvBNAct(inp, self.last_channel, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.num_features = self.last_channel
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        self.pretrained_rebuilt_prefixes = tuple(f"features.{i}.attention." for i, m in enumerate(self.features)
                                                 if getattr(m, "attention", None) is not None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


@register_model
def mobilenetv2(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2,
                attention: str = "none", ghost: bool = False, ca_reduction: int = 32) -> nn.Module:
    """MobileNetV2 (torchvision keys); ``attention=ca`` coordinate attention, ``ghost=true`` Ghost 1x1 convs."""
    return MobileNetV2(num_classes, in_chans, width, dropout, attention, ghost, ca_reduction)
