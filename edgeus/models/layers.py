"""Small building blocks shared by several architectures (plain torch, ONNX-exportable).

- ``make_divisible(v, divisor)``: channel counts that stay multiples of ``divisor`` when ``width`` scales them.
- ``ConvBNAct``: conv + BatchNorm + activation, the unit most CNNs here are made of.
- ``SqueezeExcite``: SE channel attention (EfficientNet's MBConv).
- ``ChannelAttention`` / ``SpatialAttention`` / ``CBAM``: the convolutional block attention module
  (Woo et al., 2018): channel attention from average- and max-pooled descriptors through a shared MLP,
  then spatial attention from the channel-wise mean and max through a 7x7 conv.
- ``SoftThreshold``: shrinkage attention (deep residual shrinkage networks): a per-channel threshold
  ``tau = |x|_mean * sigmoid(MLP(|x|_mean))`` and ``y = sign(x) * max(|x| - tau, 0)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), never below 90 % of ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + activation (``act=None`` for none)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU):
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU) else act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(fc2(act(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module] = nn.SiLU):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(s))))


class ChannelAttention(nn.Module):
    """CBAM channel attention: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with a shared MLP."""

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4):
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        mx = self.fc2(self.act(self.fc1(F.adaptive_max_pool2d(x, 1))))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: ``sigmoid(conv7x7([mean_c(x), max_c(x)]))``."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(desc))


class CBAM(nn.Module):
    """Convolutional block attention module: channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(spatial_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


class SoftThreshold(nn.Module):
    """Soft-threshold (shrinkage) attention, channel-wise thresholds as in DRSN-CW.

    ``a = GAP(|x|)``; ``tau = a * sigmoid(fc2(relu(fc1(a))))`` (so ``0 < tau < mean|x|``);
    ``y = sign(x) * relu(|x| - tau)``: small (noise-like, e.g. speckle) responses are zeroed, the rest
    shrunk towards zero by a learned, input-dependent amount.
    """

    def __init__(self, channels: int, reduction: int = 4, min_hidden: int = 4):
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mag = x.abs()
        a = F.adaptive_avg_pool2d(mag, 1)
        tau = a * torch.sigmoid(self.fc2(self.act(self.fc1(a))))
        return torch.sign(x) * F.relu(mag - tau)
