"""Evaluation sets for comparing FP32 and INT8 ONNX models.

    ev = EvalSet(bundle.val, bundle.classes, name="val")
    m = ev.metrics("student.int8.onnx")        # edgeus.evaluate.compute_metrics on ONNX Runtime logits
    fid = FidelitySet.from_bundle(bundle, views=1)
    f = fid.compare("student.fp32.onnx", "student.int8.onnx")   # top-1 agreement, flips per class

A split is held as arrays once, so each candidate model (PTQ, each fallback trial, QAT) is
evaluated quickly and identically. ``optimization="disable"`` evaluates a Q/DQ model simulated in
float (see :func:`edgeus.quantize.isa.evaluation_plan`).

Fidelity: a small val split cannot tell a model that agrees with FP32 from one that happens to
score the same. :class:`FidelitySet` holds every non-test image - the train split without
augmentation, val, and ``views`` augmented views of each train image (the data layer's
augmentation, seeded per image, so the set is the same every run) - and compares FP32 and INT8
top-1 on all of them: overall agreement and, per class (by label), the fraction of images whose
prediction flips. The test split is never touched.
"""
from __future__ import annotations

import numpy as np

from edgeus.quantize import fallback as fb


class EvalSet:
    """A split held as arrays once, so each candidate model is evaluated quickly and identically."""

    def __init__(self, dataset, classes: list[str], ece_bins: int = 15, name: str = "val"):
        self.x = np.stack([dataset[i]["image"].numpy().astype(np.float32) for i in range(len(dataset))])
        self.y = np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], np.int64)
        self.classes, self.ece_bins, self.name = list(classes), ece_bins, name

    def logits(self, path, optimization: str | None = None) -> np.ndarray:
        return fb.run_logits(path, self.x, optimization=optimization)

    def metrics(self, path, optimization: str | None = None) -> dict:
        from edgeus.evaluate import compute_metrics

        return compute_metrics(self.y, fb.softmax(self.logits(path, optimization).astype(np.float64)), self.classes,
                               self.ece_bins)


class FidelitySet:
    """Every non-test image (train without augmentation, val, augmented train views) for FP32/INT8 agreement."""

    def __init__(self, x: np.ndarray, y: np.ndarray, source: np.ndarray, classes: list[str]):
        self.x, self.y, self.source, self.classes = x, y, source, list(classes)
        self._ref: dict = {}

    @classmethod
    def from_bundle(cls, bundle, views: int = 1, seed: int = 0) -> "FidelitySet":
        import torch

        from edgeus.data.transforms import Augment, normalise

        xs, ys, src = [], [], []
        for name in ("train_plain", "val"):
            ds = bundle.split(name)
            for i in range(len(ds)):
                item = ds[i]
                xs.append(item["image"].numpy().astype(np.float32))
                ys.append(int(item["label"]))
                src.append("train" if name == "train_plain" else "val")
        ds, pre, aug = bundle.train_plain, bundle.preprocessing, Augment()
        for v in range(int(views)):
            for i in range(len(ds)):
                img, mask = ds.raw(i)
                g = torch.Generator().manual_seed((int(seed) * 1_000_003 + v * 100_003 + i) & 0x7FFFFFFF)
                img, _ = aug(img, mask, g)
                xs.append(normalise(img, pre["in_chans"], pre["mean"], pre["std"]).numpy().astype(np.float32))
                ys.append(int(ds.labels[i]))
                src.append("augmented")
        return cls(np.stack(xs), np.asarray(ys, np.int64), np.asarray(src), list(bundle.classes))

    def __len__(self) -> int:
        return len(self.y)

    def predictions(self, path, optimization: str | None = None) -> np.ndarray:
        return fb.run_logits(path, self.x, optimization=optimization).argmax(1)

    def compare(self, ref_path, path, optimization: str | None = None) -> dict:
        """Top-1 agreement of ``path`` with ``ref_path`` (FP32, run natively and cached) on every image,
        per source and per class (label): images, flips, flip rate."""
        key = str(ref_path)
        if key not in self._ref:
            self._ref[key] = self.predictions(ref_path)
        ref, got = self._ref[key], self.predictions(path, optimization)
        same = ref == got
        per_class = {}
        for k, c in enumerate(self.classes):
            sel = self.y == k
            n = int(sel.sum())
            flips = int((~same[sel]).sum())
            per_class[c] = {"n": n, "flips": flips, "flip_rate": flips / n if n else 0.0}
        by_source = {s: float(same[self.source == s].mean()) for s in ("train", "val", "augmented")
                     if (self.source == s).any()}
        worst = max(per_class, key=lambda c: per_class[c]["flip_rate"]) if per_class else None
        return {"n": int(len(same)), "agreement": float(same.mean()), "flips": int((~same).sum()),
                "by_source": by_source, "per_class": per_class, "worst_class": worst,
                "worst_flip_rate": per_class[worst]["flip_rate"] if worst else 0.0}


def brief(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "recall": m["recall"], "ece": m["ece"], "n": m["n"]}


__all__ = ["EvalSet", "FidelitySet", "brief"]
