"""Runners: one per backend, one interface (``activate`` / ``infer`` / ``deactivate``).

Only the ONNX Runtime runner is imported eagerly; torch and TensorRT load when used.
"""
from __future__ import annotations

from pathlib import Path

from edgeus.deploy.runners.base import BaseRunner, TensorMeta
from edgeus.errors import EdgeusError

BACKENDS = ("onnxruntime", "torch", "tensorrt")
_SUFFIX = {".onnx": "onnxruntime", ".pt": "torch", ".pth": "torch", ".engine": "tensorrt", ".plan": "tensorrt",
           ".trt": "tensorrt"}


def backend_for(path: str | Path, requested: str = "auto") -> str:
    suffix = Path(path).suffix.lower()
    natural = _SUFFIX.get(suffix)
    if natural is None:
        raise EdgeusError(f"{path}: unknown model file type {suffix!r} (expected .onnx, .pt or .engine)")
    if requested in (None, "", "auto") or requested == natural:
        return natural
    if requested not in BACKENDS:
        raise EdgeusError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)} or auto")
    files = {"onnxruntime": ".onnx", "torch": ".pt (edgeus checkpoint)", "tensorrt": ".engine"}
    raise EdgeusError(f"{Path(path).name}: bench.backend={requested} runs {files[requested]} files, this file is "
                      f"for {natural} (use bench.backend=auto; bench.device=cuda gives ONNX Runtime's "
                      "CUDA/TensorRT providers)")


def make_runner(path: str | Path, bench_cfg=None, *, backend: str = "auto", name: str | None = None) -> BaseRunner:
    """A runner for a model file (.onnx -> onnxruntime, .pt -> torch, .engine -> tensorrt)."""
    g = (lambda k, d=None: getattr(bench_cfg, k, d) if bench_cfg is not None else d)
    kind = backend_for(path, backend if backend != "auto" else (g("backend") or "auto"))
    device = g("device", "cpu") or "cpu"
    if kind == "onnxruntime":
        from edgeus.deploy.runners.onnxrt import OnnxrtRunner

        providers = list(g("providers")) if g("providers") else None
        return OnnxrtRunner(path, device=device, providers=providers, threads=g("threads"), name=name)
    if kind == "torch":
        from edgeus.deploy.runners.pytorch import TorchRunner

        shape = None
        if g("image_size"):
            shape = [int(g("in_chans") or 1), int(g("image_size")), int(g("image_size"))]
        return TorchRunner(path, device=device, fp16=bool(g("fp16", False)), input_shape=shape,
                           threads=g("threads"), name=name)
    from edgeus.deploy.runners.trt import TrtRunner

    return TrtRunner(path, name=name)


__all__ = ["BACKENDS", "BaseRunner", "TensorMeta", "backend_for", "make_runner"]
