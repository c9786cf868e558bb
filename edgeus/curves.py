"""ROC and precision-recall curves and average precision (the seed papers' metrics, issue 20.5).

Seed 000 reports both classes' AP beside ROC-AUC; seed 001 shows ROC curves. One-vs-rest per class:
the positives are the images of that class, the score is its softmax probability.

- :func:`roc_curve` / :func:`pr_curve`: the curve points, one per distinct score threshold (tied
  scores form one point), from the strictest threshold to the loosest, as plain lists (JSON-able, for
  the report's figures).
- :func:`average_precision`: AP as scikit-learn computes it, ``sum_n (R_n - R_{n-1}) P_n`` over the
  thresholds (a step function, no interpolation); None when a class has no positives.
- :func:`class_curves`: all of that for every class of a ``[N, K]`` probability matrix.

numpy only (no scikit-learn); ``edgeus.evaluate.compute_metrics`` reports ``ap`` / ``ap_per_class``
from :func:`average_precision`.
"""
from __future__ import annotations

import numpy as np


def _counts(y, score) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Cumulative true and false positives at each distinct threshold (scores descending)."""
    y = np.asarray(y).astype(np.int64).ravel()
    score = np.asarray(score, np.float64).ravel()
    if y.shape != score.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} differ in length")
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], np.int64)  # end of each tie run
    tps = np.cumsum(t)[last] if len(s) else np.array([], np.int64)
    fps = (last + 1) - tps
    return tps, fps, s[last] if len(s) else s, int(t.sum()), int(len(t) - t.sum())


def roc_curve(y, score) -> dict:
    """``{"fpr": [...], "tpr": [...], "thresholds": [...]}`` starting at (0, 0), whose threshold is None
    (above every score; scikit-learn's inf, which JSON cannot hold); with no positives (negatives) ``tpr``
    (``fpr``) stays 0."""
    tps, fps, thr, pos, neg = _counts(y, score)
    tpr = np.r_[0.0, tps / pos] if pos else np.r_[0.0, np.zeros(len(tps))]
    fpr = np.r_[0.0, fps / neg] if neg else np.r_[0.0, np.zeros(len(fps))]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [None, *thr.tolist()]}


def pr_curve(y, score) -> dict:
    """``{"precision": [...], "recall": [...], "thresholds": [...]}`` from the strictest threshold (recall
    rising), then a closing point (recall 0, precision 1) as scikit-learn appends, so the curve meets the
    axis; ``thresholds`` has one entry fewer than the points."""
    tps, fps, thr, pos, _ = _counts(y, score)
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / pos if pos else np.zeros(len(tps))
    return {"precision": [*precision.tolist(), 1.0], "recall": [*recall.tolist(), 0.0], "thresholds": thr.tolist()}


def average_precision(y, score) -> float | None:
    """AP = sum over thresholds of (recall gained) x (precision there); None without positives."""
    tps, fps, _, pos, _ = _counts(y, score)
    if pos == 0:
        return None
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def class_curves(labels, probs, classes) -> dict[str, dict]:
    """Per class (one-vs-rest): ``{"roc": roc_curve, "pr": pr_curve, "auc", "ap", "positives", "negatives"}``.
    ``auc`` is the trapezoidal area under the ROC points (equal to the rank statistic of
    ``edgeus.evaluate``); ``auc`` / ``ap`` are None where a class has no positives (or no negatives)."""
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes) or len(labels) != len(probs):
        raise ValueError(f"probs must be [N, {len(classes)}] with N = {len(labels)} labels, got {probs.shape}")
    out = {}
    for i, c in enumerate(classes):
        y = (labels == i).astype(np.int64)
        pos, neg = int(y.sum()), int(len(y) - y.sum())
        roc = roc_curve(y, probs[:, i])
        fpr, tpr = np.asarray(roc["fpr"]), np.asarray(roc["tpr"])
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) if pos and neg else None
        out[c] = {"roc": roc, "pr": pr_curve(y, probs[:, i]), "auc": auc, "ap": average_precision(y, probs[:, i]),
                  "positives": pos, "negatives": neg}
    return out
