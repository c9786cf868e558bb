"""Ultrasound-specific corruptions at graded strengths, and the accuracy of a model under each.

Applied to the image in [0, 1] (before normalisation), strength in [0, 1]:

* ``speckle``: extra multiplicative speckle (Rayleigh-distributed amplitude, unit mean);
* ``gain``: a wrong overall gain and contrast (the operator's TGC / dynamic-range knobs);
* ``blur``: a wider point-spread function (Gaussian blur, a lower-frequency probe or poor focus);
* ``shadow``: acoustic-shadow bands (vertical dark stripes from ribs, air or poor contact).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CORRUPTIONS = ("speckle", "gain", "blur", "shadow")


def corrupt(x01: torch.Tensor, kind: str, strength: float, seed: int = 0) -> torch.Tensor:
    """Corrupt a batch [B, C, H, W] of images in [0, 1]."""
    if strength <= 0:
        return x01
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = x01.shape
    if kind == "speckle":
        u = torch.rand((b, 1, h, w), generator=g).clamp_min(1e-6)
        rayleigh = torch.sqrt(-2 * torch.log(u)) / math.sqrt(math.pi / 2)   # unit mean
        out = x01 * (1 - strength + strength * rayleigh)
    elif kind == "gain":
        sign = torch.where(torch.rand((b, 1, 1, 1), generator=g) < 0.5, -1.0, 1.0)
        gain = 1 + sign * 0.6 * strength
        mean = x01.mean(dim=(2, 3), keepdim=True)
        out = (x01 - mean) * (1 - 0.5 * strength) + mean * gain
    elif kind == "blur":
        sigma = 0.3 + 2.5 * strength * max(h, w) / 64
        r = max(1, int(math.ceil(2.5 * sigma)))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=x01.dtype) ** 2 / (2 * sigma**2))
        k = (k / k.sum()).to(x01)
        y = F.conv2d(F.pad(x01.reshape(b * c, 1, h, w), (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        out = y.reshape(b, c, h, w)
    elif kind == "shadow":
        cols = torch.arange(w, dtype=x01.dtype)
        rows = torch.arange(h, dtype=x01.dtype)[:, None]
        att = torch.ones((b, 1, h, w), dtype=x01.dtype)
        n_bands = 1 + int(round(2 * strength))
        for i in range(b):
            for _ in range(n_bands):
                cx = float(torch.rand(1, generator=g)) * w
                width = (0.08 + 0.12 * strength) * w
                start = float(torch.rand(1, generator=g)) * h * 0.5
                band = torch.exp(-((cols - cx) / width) ** 8) * (rows > start)
                att[i, 0] *= 1 - 0.85 * strength * band
        out = x01 * att
    else:
        raise ValueError(f"unknown corruption {kind!r}; use one of {CORRUPTIONS}")
    return out.clamp(0, 1)


def normalised_transform(kind: str, strength: float, mean, std, seed: int = 0):
    """A transform over *normalised* batches: undo normalisation, corrupt, normalise again."""
    counter = {"i": 0}

    def fn(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        m = torch.as_tensor((list(mean) * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
        s = torch.as_tensor((list(std) * c)[:c], dtype=x.dtype).view(1, c, 1, 1)
        x01 = (x * s + m).clamp(0, 1)
        counter["i"] += 1
        y = corrupt(x01[:, :1], kind, strength, seed * 7919 + counter["i"]).expand(-1, c, -1, -1)
        return (y - m) / s

    return fn


def evaluate_robustness(models: dict, loader, classes, preprocessing, corruptions, strengths, seed: int = 0) -> dict:
    """Metrics of each model (torch module or ONNX path) on the clean and corrupted split.

    Returns {model: {"clean": {accuracy, recall}, corruption: [{strength, accuracy, macro_f1, recall}]}}.
    """
    from edgeus.evaluate import compute_metrics, predict_onnx, predict_torch

    def run(model, transform):
        if isinstance(model, torch.nn.Module):
            y, p = predict_torch(model, loader, "cpu", transform)
        else:
            y, p = predict_onnx(model, loader, transform)
        m = compute_metrics(y, p, classes)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "recall": m["recall"]}

    out = {}
    for name, model in models.items():
        res = {"clean": run(model, None)}
        for kind in corruptions:
            res[kind] = []
            for s in strengths:
                r = run(model, normalised_transform(kind, float(s), preprocessing["mean"], preprocessing["std"], seed))
                res[kind].append({"strength": float(s), **r})
        out[name] = res
    return out


def collapsed_class(recall: dict, hi: float = 0.95, lo: float = 0.1) -> str | None:
    """The class a model calls (nearly) every image, judged from per-class recall: one class found
    (recall >= ``hi``) and every other missed (recall <= ``lo``); None otherwise."""
    found = [c for c, v in recall.items() if v is not None and v >= hi]
    missed = [c for c, v in recall.items() if v is not None and v <= lo]
    return found[0] if len(found) == 1 and len(missed) == len(recall) - 1 else None


def collapses(rob: dict) -> list[dict]:
    """Every (model, corruption, strength) under which the model calls nearly everything one class:
    its accuracy there is that class's share of the split, not skill."""
    out = []
    for name, res in rob.items():
        if not isinstance(res, dict) or "clean" not in res:
            continue
        for kind, pts in res.items():
            if kind == "clean":
                continue
            for p in pts:
                c = collapsed_class(p.get("recall") or {})
                if c:
                    out.append({"model": name, "corruption": kind, "strength": p["strength"], "class": c})
    return out


def fragility(rob: dict, teacher: str, student: str) -> dict:
    """Mean accuracy lost under corruption (clean minus corrupted), teacher vs student, and every
    corruption under which a model collapses onto one class."""
    def mean_drop(name):
        clean = rob[name]["clean"]["accuracy"]
        drops = [clean - r["accuracy"] for k, v in rob[name].items() if k != "clean" for r in v]
        return float(np.mean(drops)) if drops else 0.0
    t, s = mean_drop(teacher), mean_drop(student)
    return {"teacher_mean_drop": t, "student_mean_drop": s, "more_fragile": bool(s > t + 0.02),
            "collapses": collapses({teacher: rob[teacher], student: rob[student]})}
