"""Does a Q/DQ ONNX model follow TensorRT's explicit-quantisation rules?

    problems = check_tensorrt_qdq("student.int8.onnx")   # [] = OK
    for p in problems: print(p)                          # each names the node/tensor and the rule

TensorRT's ONNX parser accepts QuantizeLinear / DequantizeLinear with int8 data and zero point
0 (symmetric); per-channel scales are allowed on weights only (TensorRT wants them per output
channel), activations are per tensor, and per-axis Q/DQ needs opset 13 or newer. Anything uint8,
any non-zero zero point, per-tensor weights, a quantised (int32) bias behind a DequantizeLinear,
contrib-domain Q/DQ or QOperator nodes (QLinearConv ...) make a model that is not TensorRT's
layout. The checker is pure ONNX (no TensorRT needed) so it runs on the CPU machines too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd",
                 "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
                 "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "DynamicQuantizeLinear",
                 "QAttention", "DynamicQuantizeMatMul"}
# op type -> (weight input index, expected per-output-channel axis: int or callable(node) -> int)
WEIGHTED = {
    "Conv": (1, 0),
    "ConvTranspose": (1, 1),
    "Gemm": (1, lambda n: 0 if _attr(n, "transB", 0) else 1),
    "MatMul": (1, -1),
}
MIN_OPSET = 13


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _load(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    return onnx.load(str(Path(model_or_path)))


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.model = model
        self.nodes = list(g.node)
        self.const: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.const_dtype: dict[str, int] = {t.name: t.data_type for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                v = _attr(n, "value")
                if isinstance(v, onnx.TensorProto):
                    self.const[n.output[0]] = numpy_helper.to_array(v)
                    self.const_dtype[n.output[0]] = v.data_type
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def label(self, n: onnx.NodeProto) -> str:
        return f"{n.op_type} '{n.name or n.output[0]}'"

    def is_weight(self, tensor: str) -> bool:
        """A constant, possibly behind Q -> DQ (AddQDQPairToWeight) or DQ of an int8 initializer."""
        if tensor in self.const:
            return True
        p = self.producer.get(tensor)
        if p is not None and p.op_type in QDQ_OPS:
            return self.is_weight(p.input[0])
        return False

    def qdq_dtype(self, n: onnx.NodeProto) -> int | None:
        """The integer type a Q produces / a DQ consumes."""
        if len(n.input) > 2 and n.input[2]:
            return self.const_dtype.get(n.input[2])
        if n.op_type == "QuantizeLinear":
            return TensorProto.UINT8  # ONNX default output type without a zero point
        x = n.input[0]
        if x in self.const_dtype:
            return self.const_dtype[x]
        p = self.producer.get(x)
        if p is not None and p.op_type == "QuantizeLinear":
            return self.qdq_dtype(p)
        return None


def _dtype_name(t: int | None) -> str:
    return TensorProto.DataType.Name(t).lower() if t is not None else "unknown"


def default_opset(model: onnx.ModelProto) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def _weight_users(g: _Graph, dq: onnx.NodeProto) -> list[tuple[onnx.NodeProto, int]]:
    """(consumer, expected axis) for a DQ feeding the weight input of Conv/Gemm/MatMul."""
    out = []
    for c in g.consumers.get(dq.output[0], []):
        if c.op_type in WEIGHTED:
            idx, axis = WEIGHTED[c.op_type]
            if c.op_type == "MatMul":
                # either side may be the constant; per output channel = last axis of B
                if len(c.input) > 1 and c.input[1] == dq.output[0]:
                    out.append((c, -1))
                continue
            if len(c.input) > idx and c.input[idx] == dq.output[0]:
                out.append((c, axis(c) if callable(axis) else axis))
    return out


def qdq_facts(model: onnx.ModelProto) -> dict:
    """Counts and types of the Q/DQ nodes (for reports and layout comparison)."""
    g = _Graph(model)
    facts = {"n_quantize": 0, "n_dequantize": 0, "activation_dtypes": set(), "weight_dtypes": set(),
             "all_zero_points_zero": True, "per_channel_weights": 0, "per_tensor_weights": 0,
             "int32_dequantize": 0, "opset": default_opset(model)}
    for n in g.nodes:
        if n.op_type not in QDQ_OPS:
            continue
        facts["n_quantize" if n.op_type == "QuantizeLinear" else "n_dequantize"] += 1
        dt = _dtype_name(g.qdq_dtype(n))
        if len(n.input) > 2 and n.input[2] in g.const and np.any(g.const[n.input[2]] != 0):
            facts["all_zero_points_zero"] = False
        if n.op_type == "DequantizeLinear" and dt == "int32":
            facts["int32_dequantize"] += 1
            continue
        if g.is_weight(n.input[0]):
            facts["weight_dtypes"].add(dt)
            if n.op_type == "DequantizeLinear" and _weight_users(g, n):
                scale = g.const.get(n.input[1])
                if scale is not None and (scale.size > 1 or _single_output_channel(g, n)):
                    facts["per_channel_weights"] += 1   # one output channel: per-tensor is per-channel
                else:
                    facts["per_tensor_weights"] += 1
        else:
            facts["activation_dtypes"].add(dt)
    return facts


def check_tensorrt_qdq(onnx_model_or_path, *, require_qdq: bool = False, placement: bool = False) -> list[str]:
    """Problems that make a model unfit for TensorRT explicit quantisation ([] = OK).

    Rules: default-domain opset >= 13; Q/DQ only from the ONNX domain; int8 only (no uint8 tensor,
    initializer or Cast anywhere); every zero point a constant int8 zero; positive finite constant
    scales; weights of Conv/ConvTranspose/Gemm/MatMul per output channel; activations per tensor;
    no int32 (quantised bias) DequantizeLinear; no QOperator nodes. ``require_qdq`` also fails a
    model with no Q/DQ at all (an INT8 artefact that is really FP32). A weight with one output
    channel passes with a per-tensor scale (the two are the same). ``placement`` also applies the
    placement rules of :func:`edgeus.quantize.placement.placement_problems` (Q/DQ on weighted-op and
    residual-add skip inputs only; none on normalisation internals or the logits).
    """
    model = _load(onnx_model_or_path)
    g = _Graph(model)
    problems: list[str] = []
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        problems.append(f"model: opset {opset} < {MIN_OPSET} (per-channel Q/DQ and TensorRT's Q/DQ import need opset >= 13)")

    # uint8 anywhere: initializers, declared tensor types, casts
    for name, dt in g.const_dtype.items():
        if dt == TensorProto.UINT8:
            problems.append(f"tensor '{name}': uint8 constant (TensorRT Q/DQ is int8 only)")
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.UINT8:
            problems.append(f"tensor '{vi.name}': declared uint8 (TensorRT Q/DQ is int8 only)")

    n_qdq = 0
    for n in g.nodes:
        if n.op_type in QOPERATOR_OPS:
            problems.append(f"{g.label(n)}: QOperator-format node (TensorRT needs QuantizeLinear/DequantizeLinear)")
            continue
        if n.op_type == "Cast" and _attr(n, "to") == TensorProto.UINT8:
            problems.append(f"{g.label(n)}: cast to uint8 (TensorRT Q/DQ is int8 only)")
            continue
        if n.op_type not in QDQ_OPS:
            continue
        n_qdq += 1
        where = g.label(n)
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain '{n.domain}' (TensorRT parses the ONNX-domain Q/DQ only)")
        # zero point
        if len(n.input) < 3 or not n.input[2]:
            if n.op_type == "QuantizeLinear":
                problems.append(f"{where}: no zero point, so the output is uint8 by ONNX default (needs an int8 zero point 0)")
        else:
            zp = n.input[2]
            if zp not in g.const:
                problems.append(f"{where}: zero point '{zp}' is not a constant")
            else:
                if g.const_dtype[zp] != TensorProto.INT8:
                    if g.const_dtype[zp] != TensorProto.UINT8:  # uint8 constants were reported above
                        problems.append(f"{where}: zero point '{zp}' is {_dtype_name(g.const_dtype[zp])}, not int8")
                if np.any(g.const[zp] != 0):
                    problems.append(f"{where}: non-zero zero point '{zp}' (asymmetric; TensorRT needs zero point 0)")
        dt = g.qdq_dtype(n)
        if n.op_type == "DequantizeLinear" and dt == TensorProto.INT32:
            problems.append(f"{where}: int32 input (quantised bias); TensorRT needs int8 DequantizeLinear and a float bias")
            continue
        # scale
        scale = g.const.get(n.input[1])
        if scale is None:
            problems.append(f"{where}: scale '{n.input[1]}' is not a constant")
        elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            problems.append(f"{where}: scale '{n.input[1]}' has non-positive or non-finite values")
        # granularity
        if g.is_weight(n.input[0]):
            if n.op_type != "DequantizeLinear":
                continue
            for user, axis in _weight_users(g, n):
                w = _weight_array(g, n.input[0])
                rank = w.ndim if w is not None else None
                want = axis % rank if (rank and axis < 0) else axis
                channels = w.shape[want] if w is not None and rank and want < rank else None
                if scale is None:
                    continue
                if scale.size <= 1:
                    if channels == 1:
                        continue    # one output channel: per-tensor and per-channel are the same scale
                    problems.append(f"{where}: per-tensor weight scale for {g.label(user)} "
                                    f"(TensorRT wants per-output-channel weights, axis {want})")
                    continue
                got = int(_attr(n, "axis", 1))
                got = got % rank if rank and got < 0 else got
                if got != want or (channels is not None and scale.size != channels):
                    problems.append(f"{where}: weight scales on axis {got} ({scale.size} values) for {g.label(user)}; "
                                    f"expected per output channel on axis {want}" + (f" ({channels} values)" if channels else ""))
        elif scale is not None and scale.size > 1:
            problems.append(f"{where}: per-channel scale on activation '{n.input[0]}' (TensorRT wants activations per tensor)")
    if require_qdq and n_qdq == 0:
        problems.append("model: no QuantizeLinear/DequantizeLinear nodes (not an explicitly quantised model)")
    if placement:
        from edgeus.quantize.placement import placement_problems

        problems.extend(placement_problems(model))
    return problems


def _single_output_channel(g: _Graph, dq: onnx.NodeProto) -> bool:
    w = _weight_array(g, dq.input[0])
    users = _weight_users(g, dq)
    if w is None or not users or not w.ndim:
        return False
    return all(w.shape[axis % w.ndim] == 1 for _, axis in users)


def _weight_array(g: _Graph, tensor: str) -> np.ndarray | None:
    if tensor in g.const:
        return g.const[tensor]
    p = g.producer.get(tensor)
    if p is not None and p.op_type in QDQ_OPS:
        return _weight_array(g, p.input[0])
    return None


__all__ = ["check_tensorrt_qdq", "qdq_facts", "default_opset"]
