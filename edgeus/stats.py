"""Statistics for teacher-vs-student comparisons on one test split.

With a hundred-odd test images one image is most of a point of accuracy, so a comparison is
reported with its uncertainty, never as two point estimates:

* :func:`paired_bootstrap` — percentile intervals of *student − teacher* for accuracy, macro-F1,
  each class's recall, macro AUC and ECE, resampling images (the same resample for both models:
  paired, so what the two models share cancels out);
* :func:`mcnemar_exact` — the exact (binomial) McNemar test on the discordant images;
* :func:`flips` — per true class, how many images the teacher got right and the student wrong,
  and the reverse (Hooker et al., *What do compressed deep neural networks forget?*, 2019);
* :func:`bootstrap_metrics` — the same percentile intervals for one model alone (accuracy,
  macro-F1, each class's recall), for tables of several models;
* :func:`images_needed` — how many test images a non-inferiority claim at a margin needs, given
  how often the two models disagree.

:func:`compare` bundles them; the ledger, the gates and the report all read its output. Sign
convention everywhere: ``student − teacher`` (a loss is negative), in fractions (×100 for points).
"""
from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054   # two-sided 95 %


def _as_arrays(y, prob_t, prob_s):
    y = np.asarray(y, np.int64)
    prob_t, prob_s = np.asarray(prob_t, np.float64), np.asarray(prob_s, np.float64)
    if prob_t.shape != prob_s.shape or prob_t.ndim != 2 or len(y) != len(prob_t):
        raise ValueError(f"labels {y.shape} and probabilities {prob_t.shape} / {prob_s.shape} do not pair up")
    return y, prob_t, prob_s


def mcnemar_exact(correct_t, correct_s) -> dict:
    """Exact two-sided McNemar test. ``b`` = teacher right & student wrong, ``c`` = the reverse.

    p = min(1, 2 · P[X ≤ min(b, c)]) with X ~ Binomial(b + c, 1/2); p = 1 when nobody disagrees.
    """
    from scipy.stats import binom

    correct_t, correct_s = np.asarray(correct_t, bool), np.asarray(correct_s, bool)
    b = int(np.sum(correct_t & ~correct_s))
    c = int(np.sum(~correct_t & correct_s))
    n = b + c
    p = 1.0 if n == 0 else float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))
    return {"teacher_only_right": b, "student_only_right": c, "discordant": n, "p_value": p}


def flips(y, pred_t, pred_s, classes: list[str]) -> dict:
    """{class: {"lost": teacher right → student wrong, "gained": teacher wrong → student right, "n": images}}."""
    y, pred_t, pred_s = (np.asarray(a, np.int64) for a in (y, pred_t, pred_s))
    out = {}
    for i, c in enumerate(classes):
        sel = y == i
        rt, rs = pred_t[sel] == i, pred_s[sel] == i
        out[c] = {"lost": int(np.sum(rt & ~rs)), "gained": int(np.sum(~rt & rs)), "n": int(sel.sum())}
    return out


def _recall_matrix(y: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """[B, k] recall of each class in each bootstrap resample ``idx`` [B, N] (NaN where a class is absent)."""
    yy, pp = y[idx], pred[idx]
    out = np.empty((idx.shape[0], k))
    for i in range(k):
        n = (yy == i).sum(1)
        hit = ((yy == i) & (pp == i)).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, i] = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
    return out


def _macro_f1_matrix(y: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    yy, pp = y[idx], pred[idx]
    f1 = np.zeros((idx.shape[0], k))
    for i in range(k):
        tp = ((yy == i) & (pp == i)).sum(1)
        fp = ((yy != i) & (pp == i)).sum(1)
        fn = ((yy == i) & (pp != i)).sum(1)
        den = 2 * tp + fp + fn
        f1[:, i] = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
    return f1.mean(1)


def _macro_auc(y: np.ndarray, prob: np.ndarray) -> float:
    from scipy.stats import rankdata

    aucs = []
    for i in range(prob.shape[1]):
        pos = y == i
        n1, n0 = int(pos.sum()), int((~pos).sum())
        if n1 == 0 or n0 == 0:
            continue
        r = rankdata(prob[:, i])
        aucs.append((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
    return float(np.mean(aucs)) if aucs else float("nan")


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy − confidence| over ``bins`` equal-width confidence bins, weighted by their share."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def _interval(diff: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    d = diff[np.isfinite(diff)]
    if d.size == 0:
        return None, None
    lo, hi = np.percentile(d, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def paired_bootstrap(y, prob_t, prob_s, classes: list[str], *, n_boot: int = 2000, seed: int = 0,
                     alpha: float = 0.05, ece_bins: int = 15) -> dict:
    """Percentile intervals of student − teacher: {metric: {"teacher", "student", "diff", "lo", "hi"}}.

    Metrics: ``accuracy``, ``macro_f1``, ``auc`` (macro one-vs-rest), ``ece`` and ``recall/<class>``.
    Images are resampled with replacement, the same indices for both models.
    """
    y, prob_t, prob_s = _as_arrays(y, prob_t, prob_s)
    k, n = len(classes), len(y)
    pred_t, pred_s = prob_t.argmax(1), prob_s.argmax(1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), np.int64)
    full = np.arange(n)[None, :]
    out: dict = {}

    def put(name, point_t, point_s, boot_t, boot_s):
        lo, hi = _interval(np.asarray(boot_s) - np.asarray(boot_t), alpha)
        out[name] = {"teacher": point_t, "student": point_s,
                     "diff": None if point_t is None or point_s is None else point_s - point_t, "lo": lo, "hi": hi}

    acc_t, acc_s = (pred_t[idx] == y[idx]).mean(1), (pred_s[idx] == y[idx]).mean(1)
    put("accuracy", float((pred_t == y).mean()) if n else None, float((pred_s == y).mean()) if n else None, acc_t, acc_s)
    put("macro_f1", float(_macro_f1_matrix(y, pred_t, full, k)[0]), float(_macro_f1_matrix(y, pred_s, full, k)[0]),
        _macro_f1_matrix(y, pred_t, idx, k), _macro_f1_matrix(y, pred_s, idx, k))
    rec_t, rec_s = _recall_matrix(y, pred_t, idx, k), _recall_matrix(y, pred_s, idx, k)
    pt, ps = _recall_matrix(y, pred_t, full, k)[0], _recall_matrix(y, pred_s, full, k)[0]
    for i, c in enumerate(classes):
        put(f"recall/{c}", None if np.isnan(pt[i]) else float(pt[i]), None if np.isnan(ps[i]) else float(ps[i]),
            rec_t[:, i], rec_s[:, i])
    # AUC and ECE are not vectorised: a few hundred resamples keep them to a fraction of a second
    small = idx[: min(n_boot, 500)]
    put("auc", _macro_auc(y, prob_t), _macro_auc(y, prob_s),
        [_macro_auc(y[r], prob_t[r]) for r in small], [_macro_auc(y[r], prob_s[r]) for r in small])
    ece = expected_calibration_error
    put("ece", ece(y, prob_t, ece_bins), ece(y, prob_s, ece_bins),
        [ece(y[r], prob_t[r], ece_bins) for r in small], [ece(y[r], prob_s[r], ece_bins) for r in small])
    out["_meta"] = {"n": n, "n_boot": int(n_boot), "seed": int(seed), "confidence": 1 - alpha,
                    "method": "paired percentile bootstrap over images"}
    return out


def bootstrap_metrics(y, prob, classes: list[str], *, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> dict:
    """One model's accuracy, macro-F1 and each class's recall with percentile intervals:
    ``{metric: {"value", "lo", "hi"}}`` (images resampled with replacement)."""
    y = np.asarray(y, np.int64)
    pred = np.asarray(prob).argmax(1)
    k, n = len(classes), len(y)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    full = np.arange(n)[None, :]
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]

    def entry(point, boot):
        boot = np.asarray(boot, float)
        boot = boot[~np.isnan(boot)]
        lo, hi = (float(v) for v in np.percentile(boot, q)) if len(boot) else (None, None)
        return {"value": None if np.isnan(point) else float(point), "lo": lo, "hi": hi}

    out = {"accuracy": entry(float((pred == y).mean()), (pred[idx] == y[idx]).mean(1)),
           "macro_f1": entry(_macro_f1_matrix(y, pred, full, k)[0], _macro_f1_matrix(y, pred, idx, k))}
    rec, rec_full = _recall_matrix(y, pred, idx, k), _recall_matrix(y, pred, full, k)[0]
    for i, c in enumerate(classes):
        out[f"recall/{c}"] = entry(rec_full[i], rec[:, i])
    return out


def images_needed(discordance: float, margin: float, n: int) -> int:
    """Test images needed for a 95 % interval of a paired difference to be narrower than ``margin``.

    The paired difference of two proportions has per-image variance at most the discordance rate
    (the fraction of images on which the two models differ in correctness). When no image differs,
    one discordant image in ``n`` is assumed (zero observed disagreements do not prove the rate is
    zero; with n images a disagreement rate below ~1/n cannot be seen).
    """
    if margin <= 0:
        return math.inf if n else 0
    rate = max(float(discordance), 1.0 / max(n, 1))
    return int(math.ceil((Z95 / margin) ** 2 * rate))


def compare(y, prob_t, prob_s, classes: list[str], *, n_boot: int = 2000, seed: int = 0, ece_bins: int = 15) -> dict:
    """Everything a teacher-vs-student comparison reports: intervals, McNemar, flips, discordance."""
    y, prob_t, prob_s = _as_arrays(y, prob_t, prob_s)
    pred_t, pred_s = prob_t.argmax(1), prob_s.argmax(1)
    ct, cs = pred_t == y, pred_s == y
    disc = {"all": float(np.mean(ct != cs)) if len(y) else 0.0}
    for i, c in enumerate(classes):
        sel = y == i
        disc[c] = float(np.mean(ct[sel] != cs[sel])) if sel.any() else 0.0
    return {"n": int(len(y)), "intervals": paired_bootstrap(y, prob_t, prob_s, classes, n_boot=n_boot, seed=seed,
                                                            ece_bins=ece_bins),
            "mcnemar": mcnemar_exact(ct, cs), "flips": flips(y, pred_t, pred_s, classes),
            "discordance": disc, "agreement": float(np.mean(pred_t == pred_s)) if len(y) else None}


def fmt_interval(iv: dict, scale: float = 100.0, unit: str = " pt") -> str:
    """``+1.6 pt [−0.8, +4.1]`` for one entry of :func:`paired_bootstrap` (student − teacher)."""
    if iv.get("diff") is None:
        return "n/a"
    lo = "?" if iv.get("lo") is None else f"{iv['lo'] * scale:+.1f}"
    hi = "?" if iv.get("hi") is None else f"{iv['hi'] * scale:+.1f}"
    return f"{iv['diff'] * scale:+.1f}{unit} [{lo}, {hi}]"


__all__ = ["paired_bootstrap", "bootstrap_metrics", "mcnemar_exact", "flips", "images_needed", "compare", "fmt_interval"]
