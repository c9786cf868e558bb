"""The one home of ONNX in edgeus.

    from edgeus.onnx import export_onnx, session, run_logits, read_metadata, model_info

* :mod:`edgeus.onnx.export`   — torch -> ONNX: simplified, checked, parity-tested, metadata inside;
* :mod:`edgeus.onnx.session`  — the only module that constructs ``onnxruntime.InferenceSession``;
* :mod:`edgeus.onnx.metadata` — the ``edgeus.*`` ``metadata_props`` (classes, preprocessing, arch,
  data fingerprint, quantization) read and written in one place.

Imports are lazy: onnx, onnxruntime and torch load when a function is used.
"""
from __future__ import annotations

from edgeus.lazy import lazy_exports

_API = {
    "export_onnx": "edgeus.onnx.export",
    "export_with_data": "edgeus.onnx.export",
    "parity_sample": "edgeus.onnx.export",
    "target_opset": "edgeus.onnx.export",
    "ExportParityError": "edgeus.onnx.export",
    "session": "edgeus.onnx.session",
    "run_logits": "edgeus.onnx.session",
    "read_metadata": "edgeus.onnx.metadata",
    "write_metadata": "edgeus.onnx.metadata",
    "model_info": "edgeus.onnx.metadata",
}
__all__ = list(_API)


__getattr__ = lazy_exports(__name__, _API)
