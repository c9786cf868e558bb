"""INT8 quantisation (calibration sets, target-aware Q/DQ, accuracy-aware fallback, QAT).

    from edgeus.quantize import quantize_onnx, check_tensorrt_qdq

ONNX export lives in :mod:`edgeus.onnx` (``from edgeus.onnx import export_onnx``).
For a bundle manifest: ``isa_record("student.int8.onnx")`` gives the host ISA the accuracy was
measured on, the target's ISA and how accuracy was measured (:mod:`edgeus.quantize.isa`).

Imports are lazy: ``edgeus.config`` imports this package for its dataclasses, and onnxruntime /
onnx load only when a function is used.
"""
from __future__ import annotations

from edgeus.lazy import lazy_exports

_API = {
    "quantize_onnx": "edgeus.quantize.ptq",
    "check_tensorrt_qdq": "edgeus.quantize.checker",
    "QDQLayout": "edgeus.quantize.qdq",
    "load_spec": "edgeus.quantize.calibration",
    "build_calibration_set": "edgeus.quantize.calibration",
    "qat_quantize": "edgeus.quantize.qat",
    "QATSetup": "edgeus.quantize.qat",
    "inputs_from_bundle": "edgeus.quantize.ptq",
    "EvalSet": "edgeus.quantize.evalset",
    "FidelitySet": "edgeus.quantize.evalset",
    "isa_record": "edgeus.quantize.isa",
    "detect_host": "edgeus.quantize.isa",
    "placement_problems": "edgeus.quantize.placement",
}
__all__ = list(_API)


__getattr__ = lazy_exports(__name__, _API)
