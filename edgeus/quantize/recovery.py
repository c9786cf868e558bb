"""PTQ recovery without training: bias correction of the weight-quantisation error.

    pre2, report = bias_correct(pre, int8_model, calib, work / "fp32.biascorr.onnx")

Rounding the weights of a layer shifts the mean of each of its output channels by
``sum_{i,k} (W_q - W)[o, i, k] * E[x_i]`` (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019): noticeable where an output channel has few weights
(depth-wise convolutions) and inputs are all positive (after ReLU). ``E[x_i]`` - each input
channel's mean over the calibration images and positions - is measured on the FP32 model; ``W_q``
is read from the quantised model (its DequantizeLinear or Q -> DQ of the weight), so the
correction matches ONNX Runtime's rounding exactly. The shift is subtracted from the float bias
and the model is quantised again with the same ranges: the layout and the Q/DQ placement do not
change. Layer by layer, never cumulative (each layer's own weight error against FP32 inputs).
Whether it pays is measured (``bench/quantize_ptq.py``); it is off unless
``quantize.bias_correction=true``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

log = logging.getLogger("edgeus.quantize")
CORRECTED = ("Conv", "Gemm")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input_means(model: onnx.ModelProto, names: list[str], x: np.ndarray, batch: int = 32) -> dict[str, np.ndarray]:
    """{tensor: per-channel mean over images and positions} of FP32 tensors, one pass over ``x``."""
    from edgeus.onnx.session import session

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = session(m.SerializeToString())
    inp = sess.get_inputs()[0].name
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(x), batch):
        for n, o in zip(names, sess.run(names, {inp: x[i:i + batch]})):
            axes = (0,) + tuple(range(2, o.ndim))
            sums[n] = sums.get(n, 0.0) + o.astype(np.float64).sum(axis=axes)
            counts[n] = counts.get(n, 0) + int(o.size // o.shape[1])
    return {n: sums[n] / max(counts[n], 1) for n in names}


def _quantised_weight(q: onnx.ModelProto, node_name: str) -> np.ndarray | None:
    """The weight a quantised node really uses: DQ(int8 initializer) or DQ(Q(float initializer)), dequantised."""
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    node = next((n for n in q.graph.node if n.name == node_name), None)
    if node is None or len(node.input) < 2:
        return None
    dq = prod.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    s = inits[dq.input[1]].astype(np.float64)
    z = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = int(_attr(dq, "axis", 1))
    src = dq.input[0]
    if src in inits:
        qv = inits[src].astype(np.float64)
    else:
        qn = prod.get(src)
        if qn is None or qn.op_type != "QuantizeLinear" or qn.input[0] not in inits:
            return None
        w = inits[qn.input[0]].astype(np.float64)
        lo, hi = (-128, 127) if inits[qn.input[2]].dtype == np.int8 else (0, 255)
        s_, z_ = s, z
        if np.ndim(s) == 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            s_, z_ = s.reshape(shape), (np.reshape(z, shape) if np.ndim(z) == 1 else z)
        qv = np.clip(np.round(w / s_) + z_, lo, hi)
    if np.ndim(s) == 1:
        shape = [1] * qv.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), (np.reshape(z, shape) if np.ndim(z) == 1 else z)
    return (qv - z) * s


def bias_correct(pre_path: Path, int8_path: Path, calib, out_path: Path) -> tuple[Path, dict]:
    """A copy of the FP32 model ``pre_path`` whose Conv/Gemm biases absorb the mean output shift that the
    weight rounding of ``int8_path`` (quantised from ``pre_path``) causes on the calibration images."""
    pre = onnx.load(str(pre_path))
    q = onnx.load(str(int8_path))
    inits = {t.name: t for t in pre.graph.initializer}
    nodes = [n for n in pre.graph.node if n.op_type in CORRECTED and len(n.input) > 1 and n.input[1] in inits
             and n.input[0] not in inits]
    means = _input_means(pre, sorted({n.input[0] for n in nodes}), calib.images)
    changed, largest = 0, 0.0
    for n in nodes:
        wq = _quantised_weight(q, n.name)
        if wq is None:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        dw = wq - w
        mu = means[n.input[0]]
        if n.op_type == "Gemm":
            if not _attr(n, "transB", 0):
                dw = dw.T
            shift = dw @ mu
        else:
            groups = int(_attr(n, "group", 1))
            out_c, in_per_group = dw.shape[0], dw.shape[1]
            per_group = out_c // groups
            mu_g = np.stack([mu[(o // per_group) * in_per_group:(o // per_group + 1) * in_per_group]
                             for o in range(out_c)])                                   # [out, in/groups]
            shift = (dw.reshape(out_c, in_per_group, -1).sum(-1) * mu_g).sum(1)
        shift = shift.astype(np.float32)
        if len(n.input) > 2 and n.input[2] in inits:
            b = numpy_helper.to_array(inits[n.input[2]]).astype(np.float32)
            inits[n.input[2]].CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), n.input[2]))
        else:
            bname = n.name.strip("/").replace("/", "_") + "_bias_correction"
            pre.graph.initializer.append(numpy_helper.from_array(-shift, bname))
            if len(n.input) == 2:
                n.input.append(bname)
            else:
                n.input[2] = bname
        changed += 1
        largest = max(largest, float(np.abs(shift).max()))
    onnx.save(pre, str(out_path))
    return Path(out_path), {"layers": changed, "largest_shift": largest, "images": int(len(calib.images))}


__all__ = ["bias_correct"]
