"""Dense-runtime checks: ONNX export of two models and their ONNX Runtime CPU latency, interleaved."""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def export(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Plain TorchScript-based ONNX export (edgeus.quantize.export_onnx adds simplification and checks)."""
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamo=False)
    return Path(path)


def session(path: str | Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latency_ratio(paths: dict[str, str | Path], example: torch.Tensor, runs: int = 30, warmup: int = 5,
                  threads: int = 0) -> dict:
    """Median ONNX Runtime latency (ms) of each model, measured interleaved in one process.

    Returns ``{"ms": {name: median}, "runs": runs}``; the caller forms ratios.
    """
    x = example.detach().cpu().numpy().astype(np.float32)
    sess = {k: session(p, threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sess.items()}
    for _ in range(warmup):
        for k, s in sess.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sess}
    for _ in range(runs):
        for k, s in sess.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1e3)
    return {"ms": {k: round(statistics.median(v), 4) for k, v in times.items()}, "runs": runs}


def dense_latency_ratio(before: nn.Module, after: nn.Module, example: torch.Tensor, runs: int = 20) -> dict:
    """after / before median ONNX Runtime latency (1.0 = no change)."""
    with tempfile.TemporaryDirectory() as d:
        a = export(before, example, Path(d) / "before.onnx")
        b = export(after, example, Path(d) / "after.onnx")
        r = latency_ratio({"before": a, "after": b}, example, runs=runs)
    r["ratio"] = round(r["ms"]["after"] / r["ms"]["before"], 4)
    return r
