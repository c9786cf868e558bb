"""Preprocessing (identical at training, calibration and inference) and train-time augmentation.

Augmentation follows the RSMAS-Net paper: rotation, flip, brightness and scale. Geometric changes
are applied to the lesion mask as well.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize(img: torch.Tensor, size: int, mode: str = "area") -> torch.Tensor:
    """[..., H, W] float -> [..., size, size]."""
    if img.shape[-2:] == (size, size):
        return img
    x = img.reshape(-1, 1, *img.shape[-2:])
    x = F.interpolate(x, size=(size, size), mode=mode) if mode == "area" else \
        F.interpolate(x, size=(size, size), mode=mode, align_corners=False)
    return x.reshape(*img.shape[:-2], size, size)


def normalise(img01: torch.Tensor, in_chans: int, mean, std) -> torch.Tensor:
    """[1, H, W] in [0, 1] -> [in_chans, H, W] standardised (grayscale repeated for 3 channels)."""
    x = img01.expand(in_chans, *img01.shape[-2:]) if in_chans != img01.shape[0] else img01
    mean = torch.as_tensor(list(mean) * (in_chans if len(mean) == 1 else 1), dtype=x.dtype)[:in_chans]
    std = torch.as_tensor(list(std) * (in_chans if len(std) == 1 else 1), dtype=x.dtype)[:in_chans]
    return (x - mean[:, None, None]) / std[:, None, None]


class Augment:
    """Random rotation (±deg), horizontal flip, brightness (±b) and scale (1±s); seeded per call."""

    def __init__(self, degrees: float = 15.0, flip: float = 0.5, brightness: float = 0.15, scale: float = 0.1):
        self.degrees, self.flip, self.brightness, self.scale = degrees, flip, brightness, scale

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(4, generator=g)
        angle = math.radians((u[0].item() * 2 - 1) * self.degrees)
        s = 1 + (u[1].item() * 2 - 1) * self.scale
        flip = -1.0 if u[2].item() < self.flip else 1.0
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos * flip, -sin, 0.0], [sin * flip, cos, 0.0]], dtype=img.dtype)[None]
        both = torch.cat([img, mask], 0)[None]
        grid = F.affine_grid(theta, list(both.shape), align_corners=False)
        out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        img, mask = out[:1], (out[1:] > 0.5).to(img.dtype)
        img = (img * (1 + (u[3].item() * 2 - 1) * self.brightness)).clamp(0, 1)
        return img, mask
