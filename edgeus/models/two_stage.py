"""Two-stage breast-ultrasound classifier (Long et al.): a U-Net segments the lesion, then a CNN
classifies ``[image, mask, mask]``.

U-Net (the paper's tuned layout): 5 encoder blocks of two 3x3 conv + BN + ReLU, each of the first
four followed by 2x2 max-pooling and dropout (0.1); 4 decoder blocks of a 3x3 transposed conv
(stride 2), concatenation with the encoder skip, dropout and two 3x3 conv + BN + ReLU; a 1x1 conv
with a sigmoid gives the lesion mask. Channels ``unet_base * 2^i`` (16..256 at width 1).

Classifier: any zoo model (``classifier``, default ``resnet50`` standing in for the paper's
DenseNet-201) with ``in_chans + 2`` input channels: the image and the predicted mask twice. The mask
is detached, so the classification loss does not train the segmenter; the segmenter is trained by
``auxiliary_loss(batch)`` (BCE + Dice on the samples whose ``has_mask`` is true), which the training
loop adds to the cross-entropy. With a 1-channel image the classifier sees 3 channels, so
torchvision ImageNet weights load into it unchanged (``pretrained_target = "classifier"``).

``forward(x)`` returns class logits only (ONNX export and every compression stage see a plain
classifier) and keeps the mask logits of that pass in ``self.last_mask_logits``;
``segment(x)`` returns mask probabilities.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.models.layers import make_divisible
from edgeus.models.registry import create_model, register_model


def _double_conv(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
        nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with 5 encoder blocks (4 poolings) and 4 transposed-conv decoder blocks; returns mask logits."""

    def __init__(self, in_chans: int = 1, base: int = 16, depth: int = 5, dropout: float = 0.1):
        super().__init__()
        chans = [base * 2 ** i for i in range(depth)]
        self.enc = nn.ModuleList()
        prev = in_chans
        for c in chans:
            self.enc.append(_double_conv(prev, c))
            prev = c
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, c, 3, stride=2, padding=1, output_padding=1))
            self.dec.append(_double_conv(2 * c, c))
            prev = c
        self.head = nn.Conv2d(prev, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = self.drop(self.pool(x))
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # sizes not divisible by 16: match the skip
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(self.drop(torch.cat([x, skip], dim=1)))
        return self.head(x)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


class TwoStage(nn.Module):
    pretrained_target = "classifier"

    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "resnet50",
                 unet_base: int = 16, unet_dropout: float = 0.1, seg_weight: float = 1.0,
                 classifier_kwargs: dict | None = None):
        super().__init__()
        base = make_divisible(unet_base * width, 4, min_value=4)
        self.segmenter = UNet(in_chans, base, 5, unet_dropout)
        self.classifier = create_model(classifier, num_classes=num_classes, in_chans=in_chans + 2, width=width,
                                       **dict(classifier_kwargs or {}))
        self.seg_weight = float(seg_weight)
        self.last_mask_logits: torch.Tensor | None = None

    def __getstate__(self):  # deepcopy / pickle: drop the cached (graph-holding) mask logits
        state = self.__dict__.copy()
        state["last_mask_logits"] = None
        return state

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Lesion mask probabilities [B, 1, H, W]."""
        return torch.sigmoid(self.segmenter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask_logits = self.segmenter(x)
        self.last_mask_logits = mask_logits
        mask = torch.sigmoid(mask_logits).detach()
        return self.classifier(torch.cat([x, mask, mask], dim=1))

    def auxiliary_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"seg": seg_weight * (BCE + Dice)}`` of the last forward's masks, on samples with a mask."""
        logits = self.last_mask_logits
        if logits is None:
            raise RuntimeError("two_stage.auxiliary_loss needs a forward pass first")
        has = batch["has_mask"].to(logits.device).bool()
        if not bool(has.any()):
            return {"seg": logits.sum() * 0.0}
        lg = logits[has]
        target = batch["mask"].to(logits.device)[has].to(lg.dtype)
        if target.shape[-2:] != lg.shape[-2:]:
            target = F.interpolate(target, size=lg.shape[-2:], mode="nearest")
        loss = F.binary_cross_entropy_with_logits(lg, target) + dice_loss(lg, target)
        return {"seg": self.seg_weight * loss}


@register_model
def two_stage(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "resnet50",
              unet_base: int = 16, unet_dropout: float = 0.1, seg_weight: float = 1.0,
              classifier_kwargs: dict | None = None) -> nn.Module:
    """U-Net segmenter, then a classifier on [image, mask, mask]."""
    if classifier == "two_stage":
        raise ValueError("two_stage cannot use itself as its classifier")
    return TwoStage(num_classes, in_chans, width, classifier, unet_base, unet_dropout, seg_weight, classifier_kwargs)
