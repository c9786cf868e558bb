"""DenseNet-201 (Huang et al., 2017) with torchvision's state-dict key names: seed 001's classifier.

Seed 001 (two-stage breast ultrasound) classifies ``[image, mask, mask]`` with an ImageNet
DenseNet-201. The module tree is torchvision's ``densenet201``::

    features.conv0 (7x7/2), features.norm0, features.relu0, features.pool0 (3x3/2 max)
    features.denseblock{1..4}.denselayer{N}.{norm1, relu1, conv1 (1x1), norm2, relu2, conv2 (3x3)}
    features.transition{1..3}.{norm, relu, conv (1x1), pool (2x2 avg)}
    features.norm5
    classifier (Linear)

so a torchvision checkpoint file loads with ``model.pretrained=<densenet201 .pth>`` through
:func:`edgeus.models.pretrained.load_pretrained` (the 1-channel stem sums the RGB filters, the head is
re-initialised when the class count differs). Files written by old torchvision releases name the
dense-layer parts ``norm.1`` / ``conv.2``; :meth:`DenseNet.remap_pretrained_keys` renames them the
way torchvision's own loader does.

Layout (DenseNet-201): growth rate 32, bottleneck 4 x growth, blocks of 6, 12, 48 and 32 layers, 64
stem channels, each transition halving the channels (1920 features at the end). ``width`` scales the
stem (multiples of 8) and the growth rate (multiples of 4), so ``width=1.0`` matches torchvision's
shapes exactly and ``width=0.125`` is a 4-growth toy for tests.

Every dense layer concatenates all earlier feature maps of its block (``torch.cat`` in the layer, as
in torchvision); structured pruning follows those concatenations on torch-pruning's dependency graph
(cutting one layer's new channels cuts the matching input channels of every later layer's ``norm1``
and ``conv1`` and of the transition), with no custom pruner.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.models.layers import make_divisible
from edgeus.models.registry import register_model

DENSENET201 = {"growth_rate": 32, "block_config": (6, 12, 48, 32), "num_init_features": 64, "bn_size": 4}

# torchvision's old checkpoints: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                      r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck, ``bn_size * growth`` channels), BN-ReLU-3x3 conv (``growth``)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        x = torch.cat(inputs, 1) if isinstance(inputs, (list, tuple)) else inputs
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``denselayer1..N``; layer i sees the concatenation of the block input and layers 1..i-1."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (halving the channels) - 2x2 average pooling."""

    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: tuple[int, ...] = (6, 12, 48, 32),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0, num_classes: int = 3,
                 in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(in_chans, num_init_features, 7, 2, 3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, 1)),
        ]))
        n = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, n, bn_size, growth_rate, drop_rate))
            n += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(n, n // 2))
                n //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(n))
        self.num_features = n
        self.classifier = nn.Linear(n, num_classes)
        for m in self.modules():   # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @staticmethod
    def remap_pretrained_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Old torchvision names (``denselayer1.norm.1.weight``) as today's (``denselayer1.norm1.weight``)."""
        out = {}
        for k, v in state.items():
            m = _OLD_KEY.match(k)
            out[m.group(1) + m.group(2) if m else k] = v
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def densenet_dims(width: float, growth_rate: int = 32, num_init_features: int = 64) -> tuple[int, int]:
    """(growth rate, stem channels) at ``width``: torchvision's at 1.0; growth in multiples of 4, stem of 8."""
    if width == 1.0:
        return growth_rate, num_init_features
    return make_divisible(growth_rate * width, 4, min_value=4), make_divisible(num_init_features * width, 8)


@register_model
def densenet201(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, drop_rate: float = 0.0) -> nn.Module:
    """DenseNet-201 (torchvision keys; ``model.pretrained=<torchvision densenet201 .pth>`` loads into it)."""
    growth, stem = densenet_dims(width, DENSENET201["growth_rate"], DENSENET201["num_init_features"])
    return DenseNet(growth, DENSENET201["block_config"], stem, DENSENET201["bn_size"], drop_rate, num_classes, in_chans)
