"""EfficientNet-B0 with CBAM, after Xu & Liu's echocardiographic view recognition (CAMUS).

The B0 trunk (Tan & Le, 2019; the paper's Table 1): a 3x3 stem (32), seven stages of MBConv with
squeeze-excitation (MBConv1 k3 16 x1, MBConv6 k3 24 x2, k5 40 x2, k3 80 x3, k5 112 x3, k5 192 x4,
k3 320 x1), a 1x1 head conv (1280), pooling and a linear layer. The module tree and key names are
torchvision's ``efficientnet_b0`` (``features.N...``, ``classifier.1``), so a torchvision checkpoint
loads with ``model.pretrained=<path>`` (the CBAM modules then start from their own initialisation).

CBAM (channel attention from average- and max-pooled descriptors through a shared MLP, then spatial
attention from the channel mean and max through a 7x7 conv; ``edgeus.models.layers.CBAM``) is added
to the trunk. The paper's figure of where it sits survives only as OCR, so placement is an argument:
``cbam="head"`` (default) refines the 1280-channel feature map before pooling; ``"stages"`` adds one
after each of the seven MBConv stages; ``"both"`` does both.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.layers import CBAM, ConvBNAct, SqueezeExcite, make_divisible
from edgeus.models.registry import register_model

# expand ratio, kernel, stride, in, out, layers (EfficientNet-B0)
B0_STAGES = (
    (1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1),
)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation (torchvision's ``block`` layout)."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, expand_ratio: int, se_ratio: float = 0.25,
                 drop_path: float = 0.0):
        super().__init__()
        hidden = make_divisible(inp * expand_ratio, 8)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(ConvBNAct(inp, hidden, 1, act=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcite(hidden, max(1, int(inp * se_ratio))),
            ConvBNAct(hidden, oup, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.use_res_connect:
            return out
        if self.training and self.drop_path > 0:
            keep = torch.rand(out.shape[0], 1, 1, 1, device=out.device) >= self.drop_path
            out = out * keep.to(out.dtype) / (1.0 - self.drop_path)
        return x + out


class EfficientNetB0CBAM(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2,
                 cbam: str = "head", cbam_reduction: int = 16, drop_path_rate: float = 0.2):
        super().__init__()
        if cbam not in ("head", "stages", "both", "none"):
            raise ValueError(f"cbam must be head | stages | both | none, not {cbam!r}")
        ch = lambda c: make_divisible(c * width, 8)  # noqa: E731
        stem = ch(32)
        features: list[nn.Module] = [ConvBNAct(in_chans, stem, 3, 2, act=nn.SiLU)]
        total = sum(s[-1] for s in B0_STAGES)
        idx, inp = 0, stem
        stage_cbam = []
        for t, k, s, _, c, n in B0_STAGES:
            out = ch(c)
            blocks = []
            for i in range(n):
                blocks.append(MBConv(inp, out, k, s if i == 0 else 1, t, drop_path=drop_path_rate * idx / total))
                inp, idx = out, idx + 1
            features.append(nn.Sequential(*blocks))
            stage_cbam.append(CBAM(out, cbam_reduction) if cbam in ("stages", "both") else nn.Identity())
        head = 1280 if width == 1.0 else make_divisible(1280 * width, 8)
        features.append(ConvBNAct(inp, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.stage_cbam = nn.ModuleList(stage_cbam) if cbam in ("stages", "both") else None
        self.cbam = CBAM(head, cbam_reduction) if cbam in ("head", "both") else nn.Identity()
        self.num_features = head
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / m.out_features ** 0.5
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)
        self.pretrained_rebuilt_prefixes = ("cbam.", "stage_cbam.")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[0](x)
        for i in range(1, len(self.features) - 1):
            x = self.features[i](x)
            if self.stage_cbam is not None:
                x = self.stage_cbam[i - 1](x)
        return self.cbam(self.features[-1](x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        return self.classifier(x)


@register_model
def efficientnet_b0_cbam(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.2,
                         cbam: str = "head", cbam_reduction: int = 16, drop_path_rate: float = 0.2) -> nn.Module:
    """EfficientNet-B0 + CBAM (torchvision keys for the B0 trunk)."""
    return EfficientNetB0CBAM(num_classes, in_chans, width, dropout, cbam, cbam_reduction, drop_path_rate)
