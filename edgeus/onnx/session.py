"""ONNX Runtime sessions: the only place in edgeus that constructs ``onnxruntime.InferenceSession``.

    sess = session("model.onnx", threads=1)                 # CPU, quiet logging
    logits = run_logits("model.onnx", x)                    # float32 [N, C, H, W] -> [N, K], in batches of 64
    logits = run_logits(sess, x, batch=None)                # one call

Options are those every caller used before this module existed, so numbers do not change:
log severity 3 (errors only), ``CPUExecutionProvider`` unless ``providers`` are given, ONNX
Runtime's default graph optimisation level unless ``optimization`` is given, intra-op threads
only when ``threads`` is given (inter-op threads only when ``inter_threads`` is given).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeus.errors import EdgeusError, InputError

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


def _is_session(obj) -> bool:
    return hasattr(obj, "run") and hasattr(obj, "get_inputs")


def session(model, *, threads: int | None = None, inter_threads: int | None = None,
            providers: list[str] | None = None, optimization: str | None = None, log_severity: int = 3):
    """An ``onnxruntime.InferenceSession`` over a path, serialized bytes or an ``onnx.ModelProto``.

    An existing session is returned as it is. ``optimization``: disable | basic | extended | all.
    Raises :class:`EdgeusError` when the file is missing or ONNX Runtime cannot load it.
    """
    if _is_session(model):
        return model
    import onnxruntime as ort

    if hasattr(model, "SerializeToString"):
        src, label = model.SerializeToString(), "the ONNX model"
    elif isinstance(model, (bytes, bytearray)):
        src, label = bytes(model), "the ONNX model"
    else:
        if not Path(model).is_file():
            raise EdgeusError(f"ONNX model not found: {model}")
        src, label = str(model), str(model)
    so = ort.SessionOptions()
    so.log_severity_level = int(log_severity)
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_threads:
        so.inter_op_num_threads = int(inter_threads)
    if optimization:
        if optimization not in _OPT_LEVELS:
            raise EdgeusError(f"ONNX Runtime optimization={optimization!r}; expected one of {list(_OPT_LEVELS)}")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    try:
        return ort.InferenceSession(src, so, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:
        raise InputError(f"onnxruntime cannot load {label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def run_logits(model, x: np.ndarray, batch: int | None = 64, **session_kw) -> np.ndarray:
    """The first output of ``model`` (path, bytes, ModelProto or session) on ``x``, ``batch`` rows per call
    (``None``: one call). ``x`` is passed as float32."""
    sess = session(model, **session_kw)
    name = sess.get_inputs()[0].name
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    if batch is None or len(x) <= batch:
        return sess.run(None, {name: x})[0]
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


__all__ = ["session", "run_logits"]
