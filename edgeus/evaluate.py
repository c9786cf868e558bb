"""Clinical evaluation: accuracy, per-class precision/recall/F1, macro-F1, one-vs-rest AUC and PR-AP,
confusion matrix and expected calibration error — for torch models, ONNX files and TensorRT engines.

Per-class recall is first-class: the compress gates compare a student with its teacher on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeus.curves import average_precision
from edgeus.stats import expected_calibration_error  # noqa: F401  (part of this module's API too)


def _auc_binary(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank statistic (ties get average ranks)."""
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), float)
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def compute_metrics(labels, probs, classes, ece_bins: int = 15) -> dict:
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    k = len(classes)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probs must be [N, {k}], got {probs.shape}")
    pred = probs.argmax(1)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels, pred), 1)
    per_class, f1s = {}, []
    for i, c in enumerate(classes):
        tp, fp, fn = cm[i, i], cm[:, i].sum() - cm[i, i], cm[i, :].sum() - cm[i, i]
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[c] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(cm[i].sum())}
        f1s.append(f)
    aucs = {c: _auc_binary((labels == i).astype(int), probs[:, i]) for i, c in enumerate(classes)}
    valid = [a for a in aucs.values() if a is not None]
    aps = {c: average_precision((labels == i).astype(int), probs[:, i]) for i, c in enumerate(classes)}  # PR-AP
    valid_ap = [a for a in aps.values() if a is not None]
    return {
        "n": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1s)),
        "recall": {c: per_class[c]["recall"] for c in classes},
        "per_class": per_class,
        "auc": float(np.mean(valid)) if valid else None,
        "auc_per_class": aucs,
        "ap": float(np.mean(valid_ap)) if valid_ap else None,
        "ap_per_class": aps,
        "ece": expected_calibration_error(labels, probs, ece_bins) if len(labels) else 0.0,
        "confusion": cm.tolist(),
        "classes": list(classes),
    }


@torch.no_grad()
def predict_torch(model: torch.nn.Module, loader, device: str = "cpu", transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities over a loader. ``transform`` maps an image batch first."""
    was = model.training
    model.eval().to(device)
    labels, probs = [], []
    for batch in loader:
        x = batch["image"].to(device)
        if transform is not None:
            x = transform(x)
        probs.append(torch.softmax(model(x).float(), 1).cpu().numpy())
        labels.append(batch["label"].numpy())
    model.train(was)
    return np.concatenate(labels), np.concatenate(probs)


def predict_onnx(path_or_session, loader, transform=None) -> tuple[np.ndarray, np.ndarray]:
    from edgeus.onnx.session import session

    sess = session(path_or_session)
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    want = ["logits"] if len(outs) > 1 and "logits" in outs else None   # a two-stage model: the mask is not needed
    labels, probs = [], []
    for batch in loader:
        x = batch["image"]
        if transform is not None:
            x = transform(x)
        logits = sess.run(want, {name: x.numpy().astype(np.float32)})[0]
        probs.append(torch.softmax(torch.from_numpy(logits).float(), 1).numpy())
        labels.append(batch["label"].numpy())
    return np.concatenate(labels), np.concatenate(probs)


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _logits_of(outputs: dict):
    """An engine's logits by name (a two-stage engine also returns its ``mask``), else its first output."""
    return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))


def predict_engine(path, loader, transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of a TensorRT engine (``edgeus.deploy.runners.trt``), each loader
    batch cut to the engine's largest profile batch. Raises MissingDependencyError without TensorRT."""
    from edgeus.deploy.runners.trt import TrtRunner

    labels, probs = [], []
    with TrtRunner(path) as r:
        (name, (dtype, shape)), = r.input_metadata().items()
        static = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        step = static or int(r.profile(name)[2][0])
        for batch in loader:
            x = batch["image"]
            if transform is not None:
                x = transform(x)
            x = x.numpy().astype(dtype)
            logits = []
            for i in range(0, len(x), step):
                chunk = x[i:i + step]
                if static and len(chunk) < static:   # a static-batch engine: pad the last chunk, keep the real rows
                    pad = np.zeros((static - len(chunk), *chunk.shape[1:]), chunk.dtype)
                    logits.append(_logits_of(r.infer({name: np.concatenate([chunk, pad])}))[:len(chunk)])
                else:
                    logits.append(_logits_of(r.infer({name: chunk})))
            probs.append(torch.softmax(torch.from_numpy(np.concatenate(logits)).float(), 1).numpy())
            labels.append(batch["label"].numpy())
    return np.concatenate(labels), np.concatenate(probs)


def predict(model_or_path, loader, device: str = "cpu", transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities of a torch model, an ONNX file / session, a TensorRT engine
    (.engine / .plan) or an edgeus checkpoint file (.pt) over a loader."""
    if isinstance(model_or_path, (str, Path)) and str(model_or_path).endswith((".pt", ".pth")):
        from edgeus.train.checkpoint import load_checkpoint

        model_or_path, _ = load_checkpoint(model_or_path)
    if isinstance(model_or_path, torch.nn.Module):
        return predict_torch(model_or_path, loader, device, transform)
    if isinstance(model_or_path, (str, Path)) and str(model_or_path).endswith(ENGINE_SUFFIXES):
        return predict_engine(model_or_path, loader, transform)
    return predict_onnx(model_or_path, loader, transform)


def evaluate_model(model_or_path, loader, classes, device: str = "cpu", ece_bins: int = 15, transform=None) -> dict:
    """Metrics of a torch model, an ONNX file / session, a TensorRT engine (.engine / .plan) or an
    edgeus checkpoint file (.pt)."""
    y, p = predict(model_or_path, loader, device, transform)
    return compute_metrics(y, p, classes, ece_bins)


def format_metrics(m: dict, title: str = "") -> str:
    """A readable table of the metrics (what ``edgeus eval`` prints)."""
    lines = [title] if title else []
    auc = f"{m['auc']:.3f}" if m.get("auc") is not None else "n/a"
    lines.append(f"n={m['n']}  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  AUC {auc}  ECE {m['ece']:.4f}")
    w = max(len(c) for c in m["classes"]) + 2
    lines.append(f"{'class'.ljust(w)}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    for c in m["classes"]:
        pc = m["per_class"][c]
        lines.append(f"{c.ljust(w)}{pc['precision']:>10.4f}{pc['recall']:>10.4f}{pc['f1']:>10.4f}{pc['support']:>9d}")
    lines.append("confusion (rows = true, cols = predicted): " + " | ".join(
        f"{c}: {row}" for c, row in zip(m["classes"], m["confusion"])))
    seg = m.get("segmentation")
    if seg and seg.get("n"):
        lines.append(f"segmentation (mask > {seg['threshold']:g}, {seg['n']} images with a mask): Dice mean "
                     f"{seg['dice_mean']:.4f} (median {seg['dice_median']:.4f}), IoU mean {seg['iou_mean']:.4f} "
                     f"(median {seg['iou_median']:.4f})")
    return "\n".join(lines)
