"""Segmentation quality of the two-stage models' U-Net (issue 20.2): Dice and IoU per image and mean.

    from edgeus.segmentation import evaluate_segmentation
    seg = evaluate_segmentation(model, loaders["test"])     # model.segment(x) -> mask probabilities
    seg["dice_mean"], seg["iou_mean"], seg["per_image"]

Only images with a ground-truth mask (``has_mask``) count. The prediction is the probability map
thresholded at ``threshold``. An image whose prediction and mask are both empty scores 1 (nothing to
find, nothing found); one where only one of them is empty scores 0.

An exported two-stage model carries the mask as its second ONNX output ``mask``
(:mod:`edgeus.onnx.export`): :func:`evaluate_segmentation_onnx` scores it the same way, and
:func:`segmentation_metrics` scores whichever it is given (torch model, ONNX file / session), or returns
None when the model does not segment or no image has a mask. It is what ``edgeus eval``, the compress
ledger rows (``metrics["dice"]``, ``metrics["iou"]``, ``metrics["segmentation"]``) and the Dice gate
(``gates.max_dice_drop``) use.
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


def _summary(rows: list[dict], threshold: float) -> dict:
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    return {"n": len(rows), "threshold": float(threshold),
            "dice_mean": float(dice.mean()) if len(rows) else None,
            "iou_mean": float(iou.mean()) if len(rows) else None,
            "dice_median": float(np.median(dice)) if len(rows) else None,
            "iou_median": float(np.median(iou)) if len(rows) else None, "per_image": rows}


def onnx_has_mask(path_or_session) -> bool:
    """Whether an ONNX model (path, bytes or session) has the ``mask`` output of a two-stage export."""
    from edgeus.onnx.export import MASK_NAME
    from edgeus.onnx.session import session

    sess = path_or_session if hasattr(path_or_session, "get_outputs") else session(path_or_session)
    return MASK_NAME in [o.name for o in sess.get_outputs()]


def evaluate_segmentation_onnx(path_or_session, loader, threshold: float = 0.5) -> dict:
    """Dice and IoU of an ONNX model's ``mask`` output (a two-stage export, FP32 or INT8) over the images
    of ``loader`` that have a mask; the same result as :func:`evaluate_segmentation`."""
    from edgeus.onnx.export import MASK_NAME
    from edgeus.onnx.session import session

    sess = path_or_session if hasattr(path_or_session, "get_outputs") else session(path_or_session)
    names = [o.name for o in sess.get_outputs()]
    if MASK_NAME not in names:
        raise TypeError(f"the ONNX model has no '{MASK_NAME}' output (outputs: {names}): not a segmenting model")
    inp = sess.get_inputs()[0].name
    rows = []
    for batch in loader:
        has = batch["has_mask"].bool()
        if not bool(has.any()):
            continue
        x = batch["image"][has].numpy().astype(np.float32)
        target = batch["mask"][has] > 0.5
        prob = torch.from_numpy(sess.run([MASK_NAME], {inp: x})[0]).float()
        if prob.shape[-2:] != target.shape[-2:]:
            prob = torch.nn.functional.interpolate(prob, size=target.shape[-2:], mode="bilinear", align_corners=False)
        d, i = dice_iou(prob > threshold, target)
        idx = batch["index"][has].tolist()
        rows += [{"index": int(k), "dice": float(a), "iou": float(b)} for k, a, b in zip(idx, d, i)]
    return _summary(rows, threshold)


def segmentation_metrics(model_or_onnx, loader, device: str = "cpu", threshold: float = 0.5) -> dict | None:
    """Dice / IoU of a torch model with a segmenter or an ONNX model with a ``mask`` output; None when the
    model does not segment or ``loader`` has no image with a mask. The global torch RNG is left as it
    was (a pass over a loader draws a seed from it): scoring the masks never changes what a later stage
    draws."""
    from pathlib import Path

    if isinstance(model_or_onnx, torch.nn.Module):
        from edgeus.onnx.export import has_segmenter

        if not has_segmenter(model_or_onnx):
            return None
        with torch.random.fork_rng(devices=[]):
            res = evaluate_segmentation(model_or_onnx, loader, device, threshold)
    else:
        if isinstance(model_or_onnx, (str, Path)) and not str(model_or_onnx).endswith(".onnx"):
            return None
        if not onnx_has_mask(model_or_onnx):
            return None
        with torch.random.fork_rng(devices=[]):
            res = evaluate_segmentation_onnx(model_or_onnx, loader, threshold)
    return res if res["n"] else None


def brief(seg: dict | None) -> dict:
    """The ledger's part of a segmentation result (no per-image list)."""
    if not seg:
        return {}
    return {"dice": seg["dice_mean"], "iou": seg["iou_mean"],
            "segmentation": {k: seg[k] for k in ("n", "dice_mean", "iou_mean", "dice_median", "iou_median", "threshold")}}


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
    return _summary(rows, threshold)
