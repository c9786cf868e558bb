"""Preprocessing (identical at training, calibration and inference) and train-time augmentation.

Two augmentation policies (``data.augment``): ``rsmas``, the RSMAS-Net paper's rotation, flip,
brightness and scale; ``ultrasound``, stronger geometry plus the intensity changes a scanner's gain,
TGC and speckle make (bench/teacher_recipe_sweep.md). Geometric changes are applied to the lesion
mask as well.
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


class UltrasoundAugment:
    """Rotation (±deg), zoom (1/z..z, log-uniform), shift (±shift of the side), horizontal flip; then
    brightness (±b), contrast about the mean (±c), gamma (1/γ..γ: gain/TGC) and multiplicative speckle
    (Gaussian, std uniform in 0..speckle). Seeded per call. (The teacher sweep's "strong US aug" is the
    same but shifted half as far; this one is what ``profile=full``'s teacher was measured with.)"""

    def __init__(self, degrees: float = 20.0, zoom: float = 1.25, shift: float = 0.1, flip: float = 0.5,
                 brightness: float = 0.2, contrast: float = 0.2, gamma: float = 1.4, speckle: float = 0.15):
        self.degrees, self.zoom, self.shift, self.flip = degrees, zoom, shift, flip
        self.brightness, self.contrast, self.gamma, self.speckle = brightness, contrast, gamma, speckle

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = [float(v) * 2 - 1 for v in torch.rand(9, generator=g)]      # uniform in [-1, 1]
        angle = math.radians(u[0] * self.degrees)
        s = math.exp(u[1] * math.log(self.zoom))
        flip = -1.0 if u[2] < 2 * self.flip - 1 else 1.0
        cos, sin = math.cos(angle) / s, math.sin(angle) / s
        theta = torch.tensor([[cos * flip, -sin, u[3] * self.shift * 2], [sin * flip, cos, u[4] * self.shift * 2]],
                             dtype=img.dtype)[None]       # affine_grid's coordinates span 2 per side
        both = torch.cat([img, mask], 0)[None]
        grid = F.affine_grid(theta, list(both.shape), align_corners=False)
        out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        img, mask = out[:1], (out[1:] > 0.5).to(img.dtype)
        img = img * (1 + u[5] * self.brightness)
        m = img.mean()
        img = ((img - m) * (1 + u[6] * self.contrast) + m).clamp(0, 1)
        img = img ** math.exp(u[7] * math.log(self.gamma))
        img = img * (1 + torch.randn(img.shape, generator=g, dtype=img.dtype) * ((u[8] + 1) / 2 * self.speckle))
        return img.clamp(0, 1), mask


AUGMENT = {"rsmas": Augment, "ultrasound": UltrasoundAugment, "none": None}


def augment_policy(name) -> "Augment | UltrasoundAugment | None":
    """``data.augment``: rsmas | ultrasound | none (true / false are rsmas / none)."""
    key = {"true": "rsmas", "false": "none", "": "none"}.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in AUGMENT:
        raise ValueError(f"data.augment={name}: use one of {', '.join(AUGMENT)}")
    cls = AUGMENT[key]
    return cls() if cls is not None else None
