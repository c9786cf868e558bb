"""Small building blocks shared by several architectures (plain torch, ONNX-exportable).

- ``make_divisible(v, divisor)``: channel counts that stay multiples of ``divisor`` when ``width`` scales them.
- ``ConvBNAct``: conv + BatchNorm + activation, the unit most CNNs here are made of.
- ``SqueezeExcite``: SE channel attention (EfficientNet's MBConv).
- ``ChannelAttention`` / ``SpatialAttention`` / ``CBAM``: the convolutional block attention module
  (Woo et al., 2018): channel attention from average- and max-pooled descriptors through a shared MLP,
  then spatial attention from the channel-wise mean and max through a 7x7 conv.
- ``SoftThreshold``: shrinkage attention (deep residual shrinkage networks): a per-channel threshold
  ``tau = |x|_mean * sigmoid(MLP(|x|_mean))`` and ``y = sign(x) * max(|x| - tau, 0)``.
- ``CoordinateAttention``: coordinate attention (Hou et al., CVPR 2021), channel attention that keeps
  the position along each spatial axis (the review's seed 002 lists it among lightweight modules).
- ``GhostModule``: the Ghost module (Han et al., CVPR 2020): half the output channels from an ordinary
  conv, the other half from a cheap depth-wise conv over them ("ghost" features), concatenated.

CoordinateAttention is plain torch ops that torch-pruning's dependency graph follows (element-wise
gates, pooling, concatenation and slicing along the spatial axes). GhostModule has a block pruner
(``edgeus.prune.seed_pruners``): traced natively, the concatenation of a conv with a depth-wise conv
of itself is pruned once per root it is reached from, which cuts far more than the ratio asks.
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


class HardSwish(nn.Module):
    """``x * relu6(x + 3) / 6`` written out (exports to any opset; ONNX's HardSwish needs opset 14)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou, Zhou & Feng, CVPR 2021), as in the authors' MobileNetV2 code.

    The feature map is pooled along each spatial axis separately (``[C, H, 1]`` and ``[C, 1, W]``), the
    two strips are concatenated along the spatial axis and go through one shared 1x1 conv (C -> ``mip``
    = max(min_hidden, C // reduction)), BatchNorm and h-swish, are split again, and two 1x1 convs
    (``mip`` -> C) with a sigmoid give a height gate and a width gate: ``y = x * a_h * a_w``.
    Unlike squeeze-excitation the gates keep *where* along each axis a channel responds (a lesion's
    row and column), at the cost of two pooled strips instead of one vector.
    """

    def __init__(self, channels: int, reduction: int = 32, min_hidden: int = 8):
        super().__init__()
        mip = max(min_hidden, channels // reduction)
        self.conv1 = nn.Conv2d(channels, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.act = HardSwish()
        self.conv_h = nn.Conv2d(mip, channels, 1)
        self.conv_w = nn.Conv2d(mip, channels, 1)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_h [B, C, H, 1], a_w [B, C, 1, W])."""
        h = x.shape[2]
        x_h = x.mean(dim=3, keepdim=True)                        # [B, C, H, 1]
        x_w = x.mean(dim=2, keepdim=True).transpose(2, 3)        # [B, C, W, 1]
        y = self.act(self.bn1(self.conv1(torch.cat([x_h, x_w], dim=2))))
        y_h, y_w = y[:, :, :h], y[:, :, h:]
        return torch.sigmoid(self.conv_h(y_h)), torch.sigmoid(self.conv_w(y_w.transpose(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h, a_w = self.gates(x)
        return x * a_h * a_w


class GhostModule(nn.Module):
    """Ghost module (Han et al., CVPR 2020) with GhostNet's ratio s = 2: ``cat([x1, cheap(x1)])``,
    ``x1 = primary(x)``.

    ``primary``: a ``kernel_size`` conv + BN (+ ReLU) to ``out / 2`` intrinsic channels; ``cheap``: a
    ``dw_size`` depth-wise conv + BN (+ ReLU) making one ghost map of each. About half a full conv's
    MACs. Output channel ``j`` and ``j + out/2`` come from the same intrinsic channel, so a structured
    prune removes them in pairs (``edgeus.prune.seed_pruners.GhostModulePruner``).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, dw_size: int = 3, stride: int = 1,
                 relu: bool = True):
        super().__init__()
        if out_ch % 2:
            raise ValueError(f"GhostModule needs an even number of output channels, got {out_ch}")
        init = out_ch // 2
        act = (lambda: nn.ReLU(inplace=True)) if relu else nn.Identity
        self.primary_conv = nn.Sequential(
            nn.Conv2d(in_ch, init, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(init), act())
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init, init, dw_size, 1, dw_size // 2, groups=init, bias=False), nn.BatchNorm2d(init), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        return torch.cat([x1, self.cheap_operation(x1)], dim=1)
