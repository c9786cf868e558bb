"""MobileNetV2 (Sandler et al., 2018), a standard lightweight student.

Module tree and key names follow torchvision's ``mobilenet_v2`` (``features.N...``,
``classifier.1``), so a torchvision checkpoint file loads with ``model.pretrained=<path>``.
``width`` is torchvision's ``width_mult`` (channels rounded to multiples of 8; the last 1x1 conv has
``1280 * max(1, width)`` channels as in torchvision).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.layers import ConvBNAct, make_divisible
from edgeus.models.registry import register_model

# expansion t, output channels c, repeats n, first stride s
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand (t > 1), 3x3 depth-wise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        inp = make_divisible(32 * width, 8)
        self.last_channel = make_divisible(1280 * max(1.0, width), 8)
        features: list[nn.Module] = [ConvBNAct(in_chans, inp, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width, 8)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


@register_model
def mobilenetv2(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2) -> nn.Module:
    """MobileNetV2 (torchvision keys)."""
    return MobileNetV2(num_classes, in_chans, width, dropout)
