"""RSMAS-Net: ResNet50 with stage 4 rebuilt from SCConv (SRU + CRU) and MDTA attention.

Ma et al., "RSMAS-Net" (Front. Med. 2025), aortic-stenosis classification on TMED-2. Stages 0-3 are
ResNet50's (torchvision key names, so ImageNet weights load into them); stage 4 keeps ResNet50's
three bottleneck blocks and their 1x1 reduce / expand convolutions and shortcut, but replaces the
3x3 convolution of each block by a combination of

- ``SCConv`` (Li et al., CVPR 2023) = ``SRU`` then ``CRU`` (equations below), and
- ``MDTA``, Restormer's multi-Dconv head transposed attention (Zamir et al., CVPR 2022),

followed by global average pooling and a linear head.

Where the modules sit (the paper gives no figure we can read, so this is our reading; see
DESIGN.md "Parameter budget"): both work at the stage-4 *bottleneck* width (512 at width 1), not
at its 2048-channel output (an MDTA at 2048 channels alone costs ~17 M parameters). Every stage-4
block's 3x3 slot is an SCConv (alpha = 1/2, r = 2, group-wise conv with 2 groups); the blocks
listed in ``mdta_blocks`` (default: the last one, ``(2,)``) use an MDTA in that slot instead. At
width 1 with 2 classes this gives 18.44 M parameters (ResNet50: 23.51 M; the paper: 17.6 M). An
SCConv in all three slots alone gives 17.86 M; SCConv + MDTA in series in the last block gives
18.92 M (``mdta_mode="after"``). The stride-2 of stage 4's first block is an average pool before its
SCConv (SCConv has no stride).

SRU (spatial reconstruction unit)::

    Xgn = GN(X)                           # GroupNorm with affine gamma, beta
    w_gamma = gamma / sum(gamma)          # per-channel information weight
    R = sigmoid(Xgn * w_gamma)
    W1 = [R >= threshold], W2 = 1 - W1    # threshold 0.5: informative / less informative
    X1 = W1 * X, X2 = W2 * X
    Xw = cat(X1[:C/2] + X2[C/2:], X1[C/2:] + X2[:C/2])   # cross reconstruction

The gate is hard (0/1) in the forward pass as the paper says; in training its gradient passes
straight through to ``R`` so the GroupNorm's gamma keeps learning which channels are informative.

CRU (channel reconstruction unit)::

    Xup, Xlow = split(Xw, [alpha*C, (1-alpha)*C])             # up_channels, low_channels
    Xup, Xlow = squeeze1(Xup), squeeze2(Xlow)                 # 1x1 convs, / r: up_squeezed, low_squeezed
    Y1 = GWC(Xup) + PWC1(Xup)                                 # C channels
    Y2 = cat(PWC2(Xlow), Xlow)                                # (C - low_squeezed) + low_squeezed = C
    S1, S2 = GAP(Y1), GAP(Y2)
    beta1 = e^S1 / (e^S1 + e^S2) = sigmoid(S1 - S2), beta2 = 1 - beta1
    Y = beta1 * Y1 + beta2 * Y2

MDTA::

    Y = LN(X)                             # per-pixel LayerNorm over channels
    Q, K, V = DWConv3x3(Conv1x1(Y)).chunk(3)   # 1x1 point-wise, then 3x3 depth-wise projections
    per head h: Qh, Kh, Vh in R^{C/heads x HW}, L2-normalised along HW
    A_h = softmax(Qh Kh^T * temperature_h)     # C/heads x C/heads (transposed attention, not HW x HW)
    out = Conv1x1(concat_h(A_h Vh)) + X

For pruning (edgeus/prune registers custom torch-pruning pruners for SCConv and MDTA): every split
size the forward passes uses is a plain int attribute a pruner can update (``CRU.up_channels``,
``CRU.low_channels``, ``MDTA.num_heads``) or is read from tensor shapes at run time (the SRU's halves,
``Y2``'s parts, MDTA's q/k/v thirds and the per-head size). Channel layout facts a pruner needs:

- ``SRU``: in = out = C; channel i is added to channel ``(i + C/2) mod C`` (so channels are paired:
  prune i together with i + C/2); ``gn.num_groups`` must divide C.
- ``CRU``: in = C split as ``[0, up_channels)`` -> ``squeeze1`` and ``[up_channels, C)`` -> ``squeeze2``;
  out = C where output channel j is ``gwc[j] + pwc1[j]`` fused with ``pwc2[j]`` for
  ``j < C - low_squeezed`` and with ``squeeze2``'s output ``j - (C - low_squeezed)`` otherwise.
  ``gwc`` is grouped (``gwc.groups``): its in and out channels must stay divisible by the groups.
- ``SCConv``: in = out = C (SRU then CRU); it has no residual of its own.
- ``MDTA``: in = out = C with a residual inside (``norm``, ``qkv`` in-channels, ``project_out``
  out-channels all follow the same C indices); ``qkv`` out-channels are [Q | K | V], each
  ``num_heads`` heads of equal size; ``temperature`` has shape [num_heads, 1, 1].
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.models.layers import make_divisible
from edgeus.models.registry import register_model
from edgeus.models.resnet50 import EXPANSION, ResNet, init_resnet_weights, make_downsample

__all__ = ["SRU", "CRU", "SCConv", "LayerNorm2d", "MDTA", "RSMASBlock", "RSMASNet", "rsmas"]


class SRU(nn.Module):
    """Spatial reconstruction unit: group-norm gating into informative / less informative parts, then
    cross reconstruction. ``in = out = channels``."""

    def __init__(self, channels: int, gn_groups: int = 16, gate_threshold: float = 0.5):
        super().__init__()
        if channels % 2 or channels % gn_groups:
            raise ValueError(f"SRU: channels ({channels}) must be even and divisible by gn_groups ({gn_groups})")
        self.gn = nn.GroupNorm(gn_groups, channels)
        self.gate_threshold = float(gate_threshold)

    def gate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks ``(W1, W2)``: 1 where an element is informative (resp. not), ``W1 + W2 = 1``."""
        gamma = self.gn.weight
        w_gamma = (gamma / gamma.sum()).reshape(1, -1, 1, 1)
        reweight = torch.sigmoid(self.gn(x) * w_gamma)
        w1 = (reweight >= self.gate_threshold).to(x.dtype)
        if self.training:  # straight-through: forward value stays 0/1, gamma gets a gradient
            w1 = w1 + (reweight - reweight.detach())
        return w1, 1.0 - w1

    @staticmethod
    def reconstruct(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """``cat(x1[:C/2] + x2[C/2:], x1[C/2:] + x2[:C/2])`` (halves read from the tensor shape)."""
        half = x1.shape[1] // 2
        x11, x12 = x1[:, :half], x1[:, half:]
        x21, x22 = x2[:, :half], x2[:, half:]
        return torch.cat([x11 + x22, x12 + x21], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.gate(x)
        return self.reconstruct(w1 * x, w2 * x)


class CRU(nn.Module):
    """Channel reconstruction unit: split (alpha), squeeze (r), transform (GWC + PWC upper, PWC + reuse
    lower), SKNet-style soft fusion. ``in = out = channels``."""

    def __init__(self, channels: int, alpha: float = 0.5, squeeze_ratio: int = 2, groups: int = 2,
                 kernel_size: int = 3):
        super().__init__()
        up = int(alpha * channels)
        low = channels - up
        up_sq, low_sq = max(1, up // squeeze_ratio), max(1, low // squeeze_ratio)
        if up_sq % groups or channels % groups:
            raise ValueError(f"CRU: squeezed upper channels ({up_sq}) and channels ({channels}) "
                             f"must be divisible by groups ({groups})")
        self.channels = channels          # in = out channels
        self.up_channels = up             # alpha * C: the "rich" part
        self.low_channels = low           # (1 - alpha) * C: the part that is reused
        self.up_squeezed = up_sq          # up_channels // r
        self.low_squeezed = low_sq        # low_channels // r
        self.squeeze1 = nn.Conv2d(up, up_sq, 1, bias=False)
        self.squeeze2 = nn.Conv2d(low, low_sq, 1, bias=False)
        self.gwc = nn.Conv2d(up_sq, channels, kernel_size, padding=kernel_size // 2, groups=groups)
        self.pwc1 = nn.Conv2d(up_sq, channels, 1, bias=False)
        self.pwc2 = nn.Conv2d(low_sq, channels - low_sq, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, low = torch.split(x, [self.up_channels, self.low_channels], dim=1)
        up, low = self.squeeze1(up), self.squeeze2(low)
        y1 = self.gwc(up) + self.pwc1(up)
        y2 = torch.cat([self.pwc2(low), low], dim=1)
        s1 = F.adaptive_avg_pool2d(y1, 1)
        s2 = F.adaptive_avg_pool2d(y2, 1)
        beta1 = torch.sigmoid(s1 - s2)    # = e^s1 / (e^s1 + e^s2), the two-way channel softmax
        return beta1 * y1 + (1.0 - beta1) * y2


class SCConv(nn.Module):
    """Spatial and channel reconstruction convolution: ``CRU(SRU(x))``; in = out = channels, stride 1."""

    def __init__(self, channels: int, alpha: float = 0.5, squeeze_ratio: int = 2, groups: int = 2,
                 kernel_size: int = 3, gn_groups: int = 16, gate_threshold: float = 0.5):
        super().__init__()
        self.sru = SRU(channels, gn_groups, gate_threshold)
        self.cru = CRU(channels, alpha, squeeze_ratio, groups, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cru(self.sru(x))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of an NCHW tensor (Restormer's norm), weight/bias [C]."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(dim=1, keepdim=True)
        xc = x - mu
        var = (xc * xc).mean(dim=1, keepdim=True)
        return xc * torch.rsqrt(var + self.eps) * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)


class MDTA(nn.Module):
    """Multi-Dconv head transposed attention with pre-norm and residual: ``x + W_p Attn(LN(x))``.

    Attention is across channels (a ``C/heads x C/heads`` map per head), so cost is linear in H*W.
    """

    def __init__(self, channels: int, num_heads: int = 8, bias: bool = False):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"MDTA: channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.norm = LayerNorm2d(channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(channels * 3, channels * 3, 3, padding=1, groups=channels * 3, bias=bias)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias)
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(self.norm(x))).chunk(3, dim=1)
        q = q.reshape(b, self.num_heads, -1, h * w)
        k = k.reshape(b, self.num_heads, -1, h * w)
        v = v.reshape(b, self.num_heads, -1, h * w)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        return torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention maps, shape [B, num_heads, C/num_heads, C/num_heads]."""
        q, k, _ = self._qkv(x)
        return self._attend(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self._qkv(x)
        out = (self._attend(q, k) @ v).reshape(b, -1, h, w)
        return x + self.project_out(out)


class RSMASBlock(nn.Module):
    """Stage-4 bottleneck: 1x1 reduce (``conv1``), [avg-pool for stride 2], SCConv or MDTA (``mixer``),
    BN + ReLU (``bn_mix``), 1x1 expand (``conv3``), residual (``downsample`` when shapes change).

    ``conv1/bn1/conv3/bn3/downsample`` keep torchvision's names and shapes; the 3x3 ``conv2/bn2`` are gone.
    """

    expansion = EXPANSION

    def __init__(self, inplanes: int, planes: int, stride: int = 1, mixer: str = "scconv", *,
                 alpha: float = 0.5, squeeze_ratio: int = 2, groups: int = 2, gn_groups: int = 16,
                 gate_threshold: float = 0.5, num_heads: int = 8, mdta_after: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride > 1 else nn.Identity()
        if mixer == "scconv":
            layers: list[nn.Module] = [SCConv(planes, alpha, squeeze_ratio, groups, 3, gn_groups, gate_threshold)]
            if mdta_after:
                layers.append(MDTA(planes, num_heads))
        elif mixer == "mdta":
            layers = [MDTA(planes, num_heads)]
        else:
            raise ValueError(f"unknown mixer {mixer!r} (scconv | mdta)")
        self.mixer = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
        self.bn_mix = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_downsample(inplanes, planes * EXPANSION, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.pool(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn_mix(self.mixer(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class RSMASNet(ResNet):
    """ResNet50 stages 0-3 (torchvision keys) + an SCConv/MDTA stage 4 + GAP + linear head."""

    def __init__(self, num_classes: int = 2, in_chans: int = 1, width: float = 1.0, *,
                 mdta_blocks: tuple[int, ...] = (2,), mdta_mode: str = "replace", alpha: float = 0.5,
                 squeeze_ratio: int = 2, groups: int = 2, gn_groups: int = 16, gate_threshold: float = 0.5,
                 num_heads: int = 8, dropout: float = 0.0):
        super().__init__((3, 4, 6, 3), num_classes, in_chans, width, dropout)
        if mdta_mode not in ("replace", "after"):
            raise ValueError(f"mdta_mode must be 'replace' or 'after', not {mdta_mode!r}")
        inplanes = self.layer3[-1].conv3.out_channels
        # stage-4 bottleneck width: a multiple of 16 so that GN groups, halves, groups and heads divide it
        planes = 512 if width == 1.0 else make_divisible(512 * width, 16)
        # at least 2 channels per GroupNorm group (a 1x1 map at tiny inputs would give one value per group)
        gn_groups = min(gn_groups, planes // 2)
        blocks = []
        for i in range(3):
            use_mdta = i in tuple(mdta_blocks)
            mixer = "mdta" if use_mdta and mdta_mode == "replace" else "scconv"
            blocks.append(RSMASBlock(inplanes if i == 0 else planes * EXPANSION, planes, 2 if i == 0 else 1, mixer,
                                     alpha=alpha, squeeze_ratio=squeeze_ratio, groups=groups, gn_groups=gn_groups,
                                     gate_threshold=gate_threshold, num_heads=num_heads,
                                     mdta_after=use_mdta and mdta_mode == "after"))
        self.layer4 = nn.Sequential(*blocks)
        self.num_features = planes * EXPANSION
        self.fc = nn.Linear(self.num_features, num_classes)
        init_resnet_weights(self.layer4)
        for m in self.layer4.modules():
            if isinstance(m, LayerNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # where torchvision ResNet50 weights are expected to fit (used by load_pretrained)
        self.pretrained_rebuilt_prefixes = ("layer4.",)


@register_model
def rsmas(num_classes: int = 2, in_chans: int = 1, width: float = 1.0, mdta_blocks: tuple = (2,),
          mdta_mode: str = "replace", alpha: float = 0.5, squeeze_ratio: int = 2, groups: int = 2,
          gn_groups: int = 16, gate_threshold: float = 0.5, num_heads: int = 8, dropout: float = 0.0) -> nn.Module:
    """RSMAS-Net (see the module docstring for the stage-4 layout and its parameter count)."""
    return RSMASNet(num_classes, in_chans, width, mdta_blocks=tuple(int(i) for i in mdta_blocks),
                    mdta_mode=mdta_mode, alpha=alpha, squeeze_ratio=squeeze_ratio, groups=groups,
                    gn_groups=gn_groups, gate_threshold=gate_threshold, num_heads=num_heads, dropout=dropout)
