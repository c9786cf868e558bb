"""Preparing an FP32 ONNX model for quantisation, and carrying its metadata to the INT8 file.

    pre = preprocess("student.fp32.onnx", work / "fp32.pre.onnx")   # ONNX Runtime's quant_pre_process
    copy_meta(pre, "student.int8.onnx", {"edgeus.quantization": {...}})

Shared by PTQ (:mod:`edgeus.quantize.ptq`) and QAT (:mod:`edgeus.quantize.qat`), which import
this module and never each other.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

log = logging.getLogger("edgeus.quantize")


def preprocess(fp32: Path, out: Path) -> Path:
    """ONNX Runtime's recommended pre-processing; falls back to a plain copy, with a warning, when it cannot run."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
        m = onnx.load(str(out))
        src = onnx.load(str(fp32), load_external_data=False)
        have = {p.key for p in m.metadata_props}
        for p in src.metadata_props:
            if p.key not in have:
                m.metadata_props.add(key=p.key, value=p.value)
        onnx.save(m, str(out))
    except Exception as e:  # pragma: no cover - depends on the graph; handled on purpose, the user sees why
        log.warning("quant_pre_process failed (%s); quantising the model as exported", str(e).splitlines()[0])
        shutil.copyfile(fp32, out)
    return out


def copy_meta(src: Path, dst: Path, extra: dict) -> None:
    """``src``'s metadata where ``dst`` lacks a key, then ``extra`` (non-strings as sorted JSON)."""
    from edgeus.onnx.metadata import copy_metadata

    copy_metadata(src, dst, extra)


__all__ = ["preprocess", "copy_meta"]
