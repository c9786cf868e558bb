"""Dense-runtime checks: ONNX export of two models and their ONNX Runtime CPU latency."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn


def export(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Plain TorchScript-based ONNX export (edgeus.quantize.export_onnx adds simplification and checks)."""
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamo=False)
    return Path(path)


def latency_ratio(paths: dict[str, str | Path], example: torch.Tensor, runs: int = 30, warmup: int = 5,
                  threads: int = 0) -> dict:
    """Median ONNX Runtime CPU latency (ms) of each model, timed with ``edgeus.deploy.bench`` in one
    process (block-interleaved, see its docstring). Returns ``{"ms": {name: median}, "runs": runs}``."""
    from edgeus.config import compose
    from edgeus.deploy import bench

    cfg = compose([f"bench.iters={runs}", f"bench.warmup={warmup}", "bench.backend=onnxruntime",
                   "bench.device=cpu", f"bench.image_size={example.shape[-1]}", f"bench.in_chans={example.shape[1]}",
                   f"bench.batch_sizes=[{example.shape[0]}]"] + ([f"bench.threads={threads}"] if threads else []))
    res = bench(list(paths.values()), cfg)
    ms = {k: round(m["batches"][str(example.shape[0])]["p50_ms"], 4) for k, m in zip(paths, res["models"])}
    return {"ms": ms, "runs": runs}


def dense_latency_ratio(before: nn.Module, after: nn.Module, example: torch.Tensor, runs: int = 20) -> dict:
    """after / before median ONNX Runtime latency (1.0 = no change)."""
    with tempfile.TemporaryDirectory() as d:
        a = export(before, example, Path(d) / "before.onnx")
        b = export(after, example, Path(d) / "after.onnx")
        r = latency_ratio({"before": a, "after": b}, example, runs=runs)
    r["ratio"] = round(r["ms"]["after"] / r["ms"]["before"], 4)
    return r
