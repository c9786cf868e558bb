"""Dense-runtime checks: the ONNX Runtime CPU latency of two models (does sparsity buy speed?).

Export through :func:`edgeus.onnx.export.export_plain` and timing through
:func:`edgeus.deploy.benchmark.latency_table`, edgeus's one latency API.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from edgeus.onnx.export import export_plain as export  # noqa: F401  (kept for callers of edgeus.prune.measure.export)


def latency_ratio(paths: dict[str, str | Path], example: torch.Tensor, runs: int = 30, warmup: int = 5,
                  threads: int = 0) -> dict:
    """Median ONNX Runtime CPU latency (ms) of each model, timed with ``edgeus.deploy.benchmark`` in one
    process (block-interleaved, see its docstring). Returns ``{"ms": {name: median}, "runs": runs}``."""
    from edgeus.deploy.benchmark import latency_table
    from edgeus.deploy.config import BenchConfig

    bcfg = BenchConfig(backend="onnxruntime", device="cpu", iters=runs, warmup=warmup, image_size=example.shape[-1],
                       in_chans=example.shape[1], batch_sizes=[example.shape[0]], threads=threads or None)
    table = latency_table(dict(paths), bcfg, seed=0)[f"batch {example.shape[0]}"]
    return {"ms": {k: round(v["median_ms"], 4) for k, v in table.items()}, "runs": runs}


def dense_latency_ratio(before: nn.Module, after: nn.Module, example: torch.Tensor, runs: int = 20) -> dict:
    """after / before median ONNX Runtime latency (1.0 = no change)."""
    with tempfile.TemporaryDirectory() as d:
        a = export(before, example, Path(d) / "before.onnx")
        b = export(after, example, Path(d) / "after.onnx")
        r = latency_ratio({"before": a, "after": b}, example, runs=runs)
    r["ratio"] = round(r["ms"]["after"] / r["ms"]["before"], 4)
    return r
