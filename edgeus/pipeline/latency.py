"""ONNX Runtime CPU latency of several models measured together, interleaved, so that the ratios
between them survive a noisy machine (medians of per-iteration times, one process, one run)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def interleaved_latency(models: dict[str, str | Path], input_shape: tuple[int, ...], iters: int = 30,
                        warmup: int = 5, threads: int | None = None, seed: int = 0) -> dict[str, dict]:
    """{name: {"median_ms", "p90_ms", "mean_ms"}} for ONNX files timed round-robin at batch input_shape[0]."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    sessions = {n: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"]) for n, p in models.items()}
    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    feeds = {n: {s.get_inputs()[0].name: x} for n, s in sessions.items()}
    for _ in range(warmup):
        for n, s in sessions.items():
            s.run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for i in range(iters):
        order = names if i % 2 == 0 else names[::-1]     # alternate who goes first
        for n in order:
            t0 = time.perf_counter()
            sessions[n].run(None, feeds[n])
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "mean_ms": float(np.mean(t))}
            for n, t in times.items()}
