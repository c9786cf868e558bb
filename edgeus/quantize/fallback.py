"""Accuracy-aware fallback: keep the most quantisation-sensitive nodes in floating point.

1. Rank the quantised compute nodes of the full INT8 model by sensitivity, label-free, on the
   calibration images (train split):
   * ``single`` (default): quantise that node alone, measure how far the logits move from FP32
     (KL divergence of the softmax, plus top-1 disagreement);
   * ``leave_one_out``: quantise everything except that node, measure how much of the full
     model's drift disappears.
2. Keep nodes in floating point in that order, one at a time, re-quantising from the cached
   ranges (no new calibration) and evaluating on the validation split, until accuracy and every
   class's recall are within the tolerance or ``max_fallback_nodes`` is reached. Each step is
   recorded: the node, its sensitivity, the metrics it bought and the bytes it cost.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeus.onnx.session import run_logits
from edgeus.quantize import qdq

log = logging.getLogger("edgeus.quantize")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def drift(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(p_fp32 || p_int8) averaged over samples + fraction of top-1 disagreements."""
    p, q = softmax(ref_logits.astype(np.float64)), softmax(logits.astype(np.float64))
    kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), 1)))
    return kl + float(np.mean(ref_logits.argmax(1) != logits.argmax(1)))


def tolerance_check(fp32: dict, int8: dict, max_accuracy_drop: float, max_recall_drop: float,
                    min_agreement: float | None = None, max_class_flip_rate: float | None = None) -> dict:
    """Compare metric dicts (edgeus.evaluate.compute_metrics); ``ok`` when both drops are within tolerance
    and, when ``int8`` carries ``fidelity`` (:meth:`FidelitySet.compare`), the top-1 agreement with FP32 on
    every non-test image is at least ``min_agreement`` and no class flips more than ``max_class_flip_rate``."""
    acc_drop = float(fp32["accuracy"] - int8["accuracy"])
    drops = {c: float(fp32["recall"][c] - int8["recall"][c]) for c in fp32["recall"]}
    worst = max(drops, key=drops.get) if drops else None
    worst_drop = drops[worst] if worst else 0.0
    eps = 1e-9
    ok = acc_drop <= max_accuracy_drop + eps and worst_drop <= max_recall_drop + eps
    # how far outside the tolerance (0 when within): used to pick the best trial when none fits
    violation = max(0.0, acc_drop - max_accuracy_drop) + max(0.0, worst_drop - max_recall_drop)
    out = {"accuracy_drop": acc_drop, "recall_drops": drops, "worst_class": worst, "worst_recall_drop": worst_drop,
           "max_accuracy_drop": float(max_accuracy_drop), "max_recall_drop": float(max_recall_drop)}
    fid = int8.get("fidelity")
    if fid is not None and min_agreement is not None and max_class_flip_rate is not None:
        agree, flip = float(fid["agreement"]), float(fid["worst_flip_rate"])
        ok = ok and agree >= min_agreement - eps and flip <= max_class_flip_rate + eps
        violation += max(0.0, min_agreement - agree) + max(0.0, flip - max_class_flip_rate)
        out.update({"agreement": agree, "min_agreement": float(min_agreement), "worst_flip_class": fid["worst_class"],
                    "worst_flip_rate": flip, "max_class_flip_rate": float(max_class_flip_rate),
                    "fidelity_images": int(fid["n"])})
    return {"ok": ok, **out, "violation": violation}


@dataclass
class Quantiser:
    """Re-quantise the pre-processed FP32 model with the cached ranges and a given exclusion set."""
    fp32_path: Path
    layout: qdq.QDQLayout
    ranges_cache: Path
    method: str
    overrides: dict | None = None

    def __call__(self, out: str | Path, exclude=(), only: list[str] | None = None) -> Path:
        return qdq.quantize_model(self.fp32_path, out, self.layout, self.ranges_cache, self.method,
                                  nodes_to_exclude=list(exclude), nodes_to_quantize=only, overrides=self.overrides)


def rank_sensitivity(quantiser: Quantiser, candidates: dict[str, str], x_rank: np.ndarray, work: Path,
                     mode: str = "single", full_model: Path | None = None, optimization: str | None = None) -> list[dict]:
    """[{node, op_type, sensitivity}] most sensitive first (INT8 run with ``optimization``, see isa.evaluation_plan)."""
    ref = run_logits(quantiser.fp32_path, x_rank)
    base = (drift(ref, run_logits(full_model, x_rank, optimization=optimization))
            if (mode == "leave_one_out" and full_model) else None)
    rows = []
    tmp = work / "sensitivity.onnx"
    for name, op in candidates.items():
        if mode == "single":
            quantiser(tmp, only=[name])
            score = drift(ref, run_logits(tmp, x_rank, optimization=optimization))
        elif mode == "leave_one_out":
            quantiser(tmp, exclude=[name])
            score = float(base - drift(ref, run_logits(tmp, x_rank, optimization=optimization)))
        else:
            raise ValueError(f"quantize.sensitivity={mode!r}; expected single or leave_one_out")
        rows.append({"node": name, "op_type": op, "sensitivity": float(score)})
    tmp.unlink(missing_ok=True)
    rows.sort(key=lambda r: (-r["sensitivity"], r["node"]))
    return rows


def greedy_fallback(quantiser: Quantiser, ranking: list[dict], evaluate: Callable[[Path], dict], fp32_metrics: dict,
                    full_metrics: dict, out_path: Path, work: Path, max_nodes: int, max_accuracy_drop: float,
                    max_recall_drop: float, **fidelity_limits) -> dict:
    """Exclude ranked nodes one at a time until within tolerance; write the chosen model to out_path."""
    full_bytes = Path(out_path).stat().st_size
    best = {"excluded": [], "metrics": full_metrics,
            "check": tolerance_check(fp32_metrics, full_metrics, max_accuracy_drop, max_recall_drop, **fidelity_limits),
            "path": out_path}
    steps, excluded, prev = [], [], full_metrics
    for i, row in enumerate(ranking[:max_nodes]):
        excluded.append(row["node"])
        trial = work / f"fallback_{i + 1:02d}.onnx"
        t0 = time.perf_counter()
        quantiser(trial, exclude=excluded)
        m = evaluate(trial)
        chk = tolerance_check(fp32_metrics, m, max_accuracy_drop, max_recall_drop, **fidelity_limits)
        steps.append({
            **row, "excluded_so_far": len(excluded),
            "accuracy": m["accuracy"], "accuracy_gain": m["accuracy"] - prev["accuracy"],
            "recall": m["recall"], "worst_recall_drop": chk["worst_recall_drop"],
            "bytes": trial.stat().st_size, "bytes_cost": trial.stat().st_size - full_bytes,
            "within_tolerance": chk["ok"], "seconds": round(time.perf_counter() - t0, 2),
        })
        log.info("fallback: kept %s (%s) in float: accuracy %.4f, worst recall drop %.4f", row["node"],
                 row["op_type"], m["accuracy"], chk["worst_recall_drop"])
        prev = m
        better = (chk["violation"], len(excluded)) < (best["check"]["violation"], len(best["excluded"]))
        if better:
            best = {"excluded": list(excluded), "metrics": m, "check": chk, "path": trial}
        if chk["ok"]:
            break
    if best["path"] != out_path:
        Path(out_path).write_bytes(Path(best["path"]).read_bytes())
    return {"steps": steps, "excluded": best["excluded"], "metrics": best["metrics"], "check": best["check"]}


__all__ = ["rank_sensitivity", "greedy_fallback", "tolerance_check", "drift", "run_logits", "Quantiser"]
