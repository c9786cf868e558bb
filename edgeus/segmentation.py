"""Segmentation quality of the two-stage models' U-Net (issue 20.2): Dice and IoU per image and mean.

    from edgeus.segmentation import evaluate_segmentation
    seg = evaluate_segmentation(model, loaders["test"])     # model.segment(x) -> mask probabilities
    seg["dice_mean"], seg["iou_mean"], seg["per_image"]

Only images with a ground-truth mask (``has_mask``) count. The prediction is the probability map
thresholded at ``threshold``. An image whose prediction and mask are both empty scores 1 (nothing to
find, nothing found); one where only one of them is empty scores 0. This module gives the numbers;
putting them in ``edgeus eval``, the ledger, a Dice-drop gate and the report is the owners' hook.
"""
from __future__ import annotations

import numpy as np
import torch


def dice_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks ``[B, 1, H, W]`` (or ``[B, H, W]``)."""
    p = pred.bool().flatten(1)
    t = target.bool().flatten(1)
    inter = (p & t).sum(1).double()
    ps, ts = p.sum(1).double(), t.sum(1).double()
    union = ps + ts - inter
    empty = (ps + ts) == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (ps + ts).clamp_min(1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice, iou


@torch.no_grad()
def evaluate_segmentation(model, loader, device: str = "cpu", threshold: float = 0.5) -> dict:
    """Dice and IoU of ``model.segment`` over the images of ``loader`` that have a mask.

    Returns ``{"n", "dice_mean", "iou_mean", "dice_median", "iou_median", "threshold", "per_image":
    [{"index", "dice", "iou"}]}`` (``index``: the position in the loader's split); the means are None
    when no image has a mask."""
    segment = getattr(model, "segment", None)
    if not callable(segment):
        raise TypeError(f"{type(model).__name__} has no segment(x): not a segmenting model")
    was = model.training
    model.eval()
    rows = []
    try:
        for batch in loader:
            has = batch["has_mask"].bool()
            if not bool(has.any()):
                continue
            x = batch["image"][has].to(device)
            target = batch["mask"][has].to(device) > 0.5
            prob = segment(x)
            if prob.shape[-2:] != target.shape[-2:]:
                prob = torch.nn.functional.interpolate(prob, size=target.shape[-2:], mode="bilinear",
                                                       align_corners=False)
            d, i = dice_iou(prob > threshold, target)
            idx = batch["index"][has].tolist()
            rows += [{"index": int(k), "dice": float(a), "iou": float(b)} for k, a, b in zip(idx, d, i)]
    finally:
        model.train(was)
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    return {"n": len(rows), "threshold": float(threshold),
            "dice_mean": float(dice.mean()) if len(rows) else None,
            "iou_mean": float(iou.mean()) if len(rows) else None,
            "dice_median": float(np.median(dice)) if len(rows) else None,
            "iou_median": float(np.median(iou)) if len(rows) else None, "per_image": rows}
