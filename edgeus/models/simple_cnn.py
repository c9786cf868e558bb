"""A small plain CNN: the quickest model to train, used by tests and as a sanity baseline."""
from __future__ import annotations

import torch
import torch.nn as nn

from edgeus.models.registry import register_model


def _ch(c: int, width: float) -> int:
    return max(4, int(round(c * width)))


class SimpleCNN(nn.Module):
    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.1):
        super().__init__()
        chans = [_ch(c, width) for c in (16, 32, 64, 128)]
        layers, prev = [], in_chans
        for c in chans:
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))


@register_model
def simple_cnn(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, dropout: float = 0.1) -> nn.Module:
    return SimpleCNN(num_classes, in_chans, width, dropout)
