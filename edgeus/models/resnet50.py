"""ResNet50 (bottleneck v1.5, stride in the 3x3 conv) with torchvision's state-dict key names.

The module tree (``conv1``, ``bn1``, ``layer1``..``layer4`` of ``Bottleneck`` blocks with
``conv1/bn1/conv2/bn2/conv3/bn3/downsample``, ``fc``) is torchvision's, so a torchvision ImageNet
checkpoint file loads with ``edgeus.models.pretrained.load_pretrained(model, path)`` (the head is
re-initialised when the class count differs; a 1-channel stem sums the RGB filters).

``width`` multiplies every channel count (64 * width stem, planes 64/128/256/512 * width, rounded to
multiples of 8); only ``width=1.0`` matches torchvision's shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.layers import make_divisible
from edgeus.models.registry import register_model

EXPANSION = 4


def scaled(c: int, width: float, divisor: int = 8) -> int:
    """Channel count ``c * width`` rounded to a multiple of ``divisor`` (``c`` itself at width 1)."""
    return c if width == 1.0 else make_divisible(c * width, divisor)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand, residual."""

    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


def make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride, make_downsample(inplanes, planes * EXPANSION, stride))]
    layers += [Bottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_resnet_weights(model: nn.Module, zero_init_residual: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)


class ResNet(nn.Module):
    """Stem (stage 0) + four bottleneck stages + global average pooling + linear head."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 3, in_chans: int = 1,
                 width: float = 1.0, dropout: float = 0.0, zero_init_residual: bool = False):
        super().__init__()
        stem = scaled(64, width)
        planes = [scaled(p, width) for p in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_chans, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = make_stage(stem, planes[0], layers[0], 1)
        self.layer2 = make_stage(planes[0] * EXPANSION, planes[1], layers[1], 2)
        self.layer3 = make_stage(planes[1] * EXPANSION, planes[2], layers[2], 2)
        self.layer4 = make_stage(planes[2] * EXPANSION, planes[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.num_features = planes[3] * EXPANSION
        self.fc = nn.Linear(self.num_features, num_classes)
        init_resnet_weights(self, zero_init_residual)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet50(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.0,
             zero_init_residual: bool = False) -> nn.Module:
    """ResNet50 (torchvision keys; ``model.pretrained=<torchvision resnet50 .pth>`` loads into it)."""
    return ResNet((3, 4, 6, 3), num_classes, in_chans, width, dropout, zero_init_residual)
