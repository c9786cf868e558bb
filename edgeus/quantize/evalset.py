"""Evaluation sets for comparing FP32 and INT8 ONNX models.

    ev = EvalSet(bundle.val, bundle.classes, name="val")
    m = ev.metrics("student.int8.onnx")        # edgeus.evaluate.compute_metrics on ONNX Runtime logits

A split is held as arrays once, so each candidate model (PTQ, each fallback trial, QAT) is
evaluated quickly and identically.
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

    def logits(self, path) -> np.ndarray:
        return fb.run_logits(path, self.x)

    def metrics(self, path) -> dict:
        from edgeus.evaluate import compute_metrics

        return compute_metrics(self.y, fb.softmax(self.logits(path).astype(np.float64)), self.classes, self.ece_bins)


def brief(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "recall": m["recall"], "ece": m["ece"], "n": m["n"]}


__all__ = ["EvalSet", "brief"]
