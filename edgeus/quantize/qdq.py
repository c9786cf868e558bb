"""Target-aware Q/DQ layouts on top of ONNX Runtime's static quantiser.

The layout comes from the target (``cfg.target.quant``, see ``targets/*.yaml``), never from the
recipe, because what is fast or even accepted differs per backend:

* ``onnxruntime`` (CPU, the default when the target says nothing): uint8 asymmetric activations,
  int8 symmetric per-channel weights, int32 bias — ONNX Runtime fuses this into QLinearConv /
  QGemm kernels (2.1x over FP32 for ResNet50 on the AVX2 machines here; symmetric int8
  activations gave no gain there). Only the ops ONNX Runtime has integer kernels for (Conv, Gemm,
  MatMul, Add, Concat, pooling) and the data movement between them are quantised (``CPU_OP_TYPES``);
  gates, normalisation internals, Softmax and Add/Mul of constants stay in float.
* ``tensorrt`` (Jetson, desktop GPUs): TensorRT's explicit quantisation — symmetric int8 with zero
  point 0 everywhere, per-output-channel weights (axis 0), per-tensor activations, float bias,
  a Q/DQ pair on each weight and a dedicated pair per consumer, Q/DQ on the *inputs* of
  Conv/Gemm/MatMul and on the skip input of residual Adds only (:mod:`edgeus.quantize.placement`;
  TensorRT fuses DQ -> Conv -> Add -> Q itself), never on normalisation internals or the logits.

The CPU layout depends on the target's ISA (``quant.isa``, :mod:`edgeus.quantize.isa`): U8S8 with
full-range int8 weights saturates in ONNX Runtime's AVX2 kernel on CPUs without VNNI, so the
portable ``cpu`` target sets ``reduce_range`` (7-bit weights) and ``cpu_vnni`` does not.

Everything is quantised with ``onnxruntime.quantization.quantize_static`` from ranges computed
once (:mod:`edgeus.quantize.calibration`), so re-quantising with a different set of nodes kept in
floating point (the accuracy fallback) costs no new calibration.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgeus.errors import EdgeusError

log = logging.getLogger("edgeus.quantize")

LAYOUTS = ("onnxruntime", "tensorrt")
TRT_OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul"]   # + the skip inputs of residual Adds (placement.py)
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops whose quantisation only moves int8 data around (never worth a fallback on their own)
# the onnxruntime (CPU) layout: the ops ONNX Runtime has integer kernels for (QLinearConv, QGemm,
# QLinearMatMul/MatMulInteger, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool/AveragePool) and the data
# movement between them. Gates (Mul, Sigmoid), normalisation (ReduceMean, Sub, Pow, Sqrt, Div, ReduceL2,
# InstanceNormalization), Softmax and thresholds stay in float, as in the TensorRT placement: quantising them
# buys no integer kernel and costs accuracy (RSMAS-Net's channel LayerNorm squares its deviations in a Mul whose
# uint8 output step, 150/255, rounds most squares to zero: that Mul quantised alone left 75 % top-1 agreement
# with FP32 on BUSI's non-test images).
CPU_OP_TYPES = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat", "GlobalAveragePool", "AveragePool",
                "MaxPool", "Relu", "Clip", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
                "Resize", "Pad"]
# ops whose output is a normalisation statistic or its inverse: an Add/Mul reading one is a normalisation internal
NORM_STATS = {"ReduceMean", "Pow", "Sqrt", "Div", "Reciprocal", "Sub", "ReduceL2", "ReduceSumSquare",
              "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool", "Relu", "Clip",
                 "Slice", "Gather", "Pad", "Identity", "Split", "Resize", "Where", "TopK", "GatherElements"}


@dataclass
class QDQLayout:
    """How Q/DQ nodes are placed and typed. Built from ``cfg.target.quant``."""
    layout: str = "onnxruntime"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    per_channel: bool = True
    quantize_bias: bool = True
    add_qdq_pair_to_weight: bool = False
    dedicated_qdq_pair: bool = False
    opset: int = 17
    op_types: list[str] | None = None      # None: the layout's default set
    reduce_range: bool = False             # 7-bit weights (ONNX Runtime on CPUs without VNNI; off by default)
    inputs_only: bool | None = None        # Q/DQ on inputs of op_types only (None: True for tensorrt)
    isa: str | None = None                 # the ISA the target runs on (isa.ISAS; None: tensorrt / x86_avx2)
    residual_qdq: bool | None = None       # Q/DQ on the skip input of residual Adds (None: True for tensorrt)

    @classmethod
    def tensorrt(cls) -> "QDQLayout":
        return cls(layout="tensorrt", activation_type="int8", weight_type="int8", activation_symmetric=True,
                   weight_symmetric=True, per_channel=True, quantize_bias=False, add_qdq_pair_to_weight=True,
                   dedicated_qdq_pair=True, opset=17, isa="tensorrt")

    @classmethod
    def from_target(cls, target: Any) -> "QDQLayout":
        """The layout of a target config (``cfg.target``) or of its ``quant`` dict; empty = cpu."""
        quant = getattr(target, "quant", target)
        quant = dict(quant or {})
        if hasattr(quant, "items"):
            quant = {k: (list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig" else v)
                     for k, v in quant.items()}
        name = quant.get("layout")
        if name is None:
            backend = getattr(target, "backend", None) if not isinstance(target, dict) else None
            name = "tensorrt" if backend == "tensorrt" else "onnxruntime"
        if name not in LAYOUTS:
            raise EdgeusError(f"target quant.layout={name!r}; expected one of {', '.join(LAYOUTS)}")
        base = cls.tensorrt() if name == "tensorrt" else cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(quant) - known)
        if unknown:
            raise EdgeusError(f"unknown key(s) in the target's quant section: {unknown}; valid: {sorted(known)}")
        values = asdict(base)
        values.update({k: v for k, v in quant.items() if v is not None})
        lay = cls(**values)
        lay.validate()
        return lay

    def validate(self) -> None:
        for key in ("activation_type", "weight_type"):
            if getattr(self, key) not in ("int8", "uint8"):
                raise EdgeusError(f"quant.{key}={getattr(self, key)!r}; expected int8 or uint8")
        if self.opset < 13 and self.per_channel:
            raise EdgeusError(f"quant.opset={self.opset}: per-channel Q/DQ needs opset >= 13")
        from edgeus.quantize.isa import ISAS

        if self.isa is not None and self.isa not in ISAS:
            raise EdgeusError(f"quant.isa={self.isa!r}; expected one of {', '.join(ISAS)}")
        if self.layout == "tensorrt" and self.isa not in (None, "tensorrt"):
            raise EdgeusError(f"a tensorrt quant layout runs on isa tensorrt, not {self.isa!r}")
        if self.layout == "tensorrt":
            bad = []
            if self.activation_type != "int8" or self.weight_type != "int8":
                bad.append("int8 activations and weights")
            if not (self.activation_symmetric and self.weight_symmetric):
                bad.append("symmetric activations and weights (zero point 0)")
            if not self.per_channel:
                bad.append("per-channel weights")
            if self.quantize_bias:
                bad.append("float bias (quantize_bias: false)")
            if self.opset < 13:
                bad.append("opset >= 13")
            if bad:
                raise EdgeusError("a tensorrt quant layout needs " + ", ".join(bad) + " (fix the target file)")

    @property
    def quantized_op_types(self) -> list[str] | None:
        if self.op_types:
            return list(self.op_types)
        return list(TRT_OP_TYPES) if self.layout == "tensorrt" else list(CPU_OP_TYPES)

    @property
    def residual_adds(self) -> bool:
        return self.layout == "tensorrt" if self.residual_qdq is None else bool(self.residual_qdq)

    @property
    def only_inputs(self) -> bool:
        return self.layout == "tensorrt" if self.inputs_only is None else bool(self.inputs_only)

    def to_dict(self) -> dict:
        return asdict(self)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile,
             "mse": CalibrationMethod.Percentile}          # a histogram calibrator; ranges chosen by mse_range
    if name not in table:
        raise EdgeusError(f"calibration method {name!r}; expected one of {', '.join(table)}")
    return table[name]


def ort_arguments(layout: QDQLayout) -> dict:
    """Keyword arguments of ``quantize_static`` that realise ``layout`` (without data/paths)."""
    from onnxruntime.quantization import QuantFormat

    extra: dict[str, Any] = {
        "ActivationSymmetric": bool(layout.activation_symmetric),
        "WeightSymmetric": bool(layout.weight_symmetric),
        "QuantizeBias": bool(layout.quantize_bias),
        "AddQDQPairToWeight": bool(layout.add_qdq_pair_to_weight),
        "DedicatedQDQPair": bool(layout.dedicated_qdq_pair),
        # per output channel: Conv/Gemm(transB) weights are [out, ...] (axis 0), MatMul B is [in, out]
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # latent ops (MaxPool, Reshape ...) follow their neighbours; forcing keeps the layout stable
        # when a neighbour is kept in floating point by the fallback
        "ForceQuantizeNoInputCheck": layout.layout != "tensorrt",
    }
    if layout.only_inputs:
        extra["OpTypesToExcludeOutputQuantization"] = list(layout.quantized_op_types or TRT_OP_TYPES)
    return dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=layout.quantized_op_types,
        per_channel=bool(layout.per_channel),
        reduce_range=bool(layout.reduce_range),
        activation_type=_qtype(layout.activation_type),
        weight_type=_qtype(layout.weight_type),
        extra_options=extra,
    )


def float_elementwise(model: onnx.ModelProto) -> list[str]:
    """Add/Mul nodes the onnxruntime layout keeps in float although their op type is quantised: an operand
    that is a constant (bias, eps, LayerNorm's affine scale and shift) or a normalisation statistic
    (``ReduceMean(x) + eps``, ``(x - mean) * (x - mean)``)."""
    const = {t.name for t in model.graph.initializer}
    const |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("Add", "Mul"):
            continue
        if any(i in const for i in n.input) or any(i in producer and producer[i].op_type in NORM_STATS
                                                   for i in n.input):
            out.append(n.name)
    return out


def quantize_model(fp32_path: str | Path, out_path: str | Path, layout: QDQLayout, ranges_cache: str | Path,
                   method: str, nodes_to_exclude: list[str] | tuple = (), overrides: dict | None = None,
                   nodes_to_quantize: list[str] | None = None) -> Path:
    """Quantise ``fp32_path`` with ranges from ``ranges_cache`` (ORT JSON), write ``out_path``.

    Nodes in ``nodes_to_exclude`` stay in floating point and read float inputs (their input Q/DQ
    pairs are bypassed even where a neighbour shares them).
    """
    from onnxruntime.quantization import quantize_static

    kwargs = ort_arguments(layout)
    if layout.layout == "onnxruntime" and layout.op_types is None:
        # the default CPU set: constant-operand and normalisation Add/Mul stay float too (see CPU_OP_TYPES)
        keep = float_elementwise(onnx.load(str(fp32_path), load_external_data=False))
        nodes_to_exclude = list(nodes_to_exclude) + [n for n in keep if n not in set(nodes_to_exclude)]
    if overrides:
        kwargs["extra_options"]["TensorQuantOverrides"] = overrides
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))  # ORT logs pre-processing advice at WARNING on every call
    try:
        quantize_static(str(fp32_path), str(out_path), calibration_data_reader=None,
                        nodes_to_exclude=list(nodes_to_exclude), nodes_to_quantize=nodes_to_quantize,
                        calibrate_method=calibration_method(method),
                        calibration_cache_path=str(ranges_cache), **kwargs)
    finally:
        quiet.setLevel(level)
    model = onnx.load(str(out_path))
    if layout.residual_adds:
        from edgeus.quantize.placement import insert_input_qdq, residual_add_inputs

        skips = [(n, i) for n, i in residual_add_inputs(onnx.load(str(fp32_path), load_external_data=False))
                 if n not in set(nodes_to_exclude) and (nodes_to_quantize is None or n in nodes_to_quantize)]
        insert_input_qdq(model, skips, ranges_cache)
    if layout.only_inputs:
        from edgeus.quantize.placement import detach_float_consumers

        detach_float_consumers(model, skips if layout.residual_adds else [])
        _prune_dead(model)
    if nodes_to_exclude:
        bypass_qdq(model, set(nodes_to_exclude))
    _stamp(model, layout)
    onnx.save(model, str(out_path))
    return out_path


def _stamp(model: onnx.ModelProto, layout: QDQLayout) -> None:
    import json

    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("edgeus.quant_layout", json.dumps(layout.to_dict(), sort_keys=True)),):
        if key in meta:
            meta[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)


def bypass_qdq(model: onnx.ModelProto, nodes: set[str]) -> None:
    """Feed ``nodes`` the float tensors behind their Q -> DQ inputs; drop Q/DQ left without users."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.name not in nodes:
            continue
        for i, name in enumerate(n.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[i] = q.input[0]
            elif q is None and any(t.name == dq.input[0] for t in g.initializer):
                # weight stored as int8 initializer: dequantise once into a float initializer
                n.input[i] = _float_weight(model, dq)
    _prune_dead(model)


def _float_weight(model: onnx.ModelProto, dq: onnx.NodeProto) -> str:
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    s = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    z = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(s) == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        s = s.reshape(shape)
        z = np.reshape(z, shape) if np.ndim(z) == 1 else z
    name = dq.output[0] + "_float"
    if name not in inits:
        model.graph.initializer.append(numpy_helper.from_array(((q - z) * s).astype(np.float32), name))
    return name


def _prune_dead(model: onnx.ModelProto) -> None:
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


# ---------------------------------------------------------------------------------------------
# inspection


def load(model_or_path) -> onnx.ModelProto:
    return model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))


def quantized_nodes(model_or_path) -> dict[str, str]:
    """{node name: op type} of the compute nodes that read a DequantizeLinear output (run in INT8)."""
    model = load(model_or_path)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in QDQ_OPS:
            continue
        if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in n.input):
            out[n.name] = n.op_type
    return out


def fallback_candidates(model_or_path) -> dict[str, str]:
    """Quantised nodes worth keeping in floating point (compute, not data movement)."""
    return {k: v for k, v in quantized_nodes(model_or_path).items() if v not in DATA_MOVEMENT}


def layout_signature(model_or_path) -> dict:
    """What identifies a Q/DQ layout independently of the scales: used to compare PTQ and QAT."""
    from edgeus.quantize.checker import qdq_facts

    facts = qdq_facts(load(model_or_path))
    return {
        # op types, not names: QAT folds BN through torch.fx, which renames nodes
        "quantized_ops": sorted(quantized_nodes(model_or_path).values()),
        "activation_dtypes": sorted(facts["activation_dtypes"]),
        "weight_dtypes": sorted(facts["weight_dtypes"]),
        "symmetric": facts["all_zero_points_zero"],
        "per_channel_weights": facts["per_channel_weights"],
        "per_tensor_weights": facts["per_tensor_weights"],
        "bias_int32": facts["int32_dequantize"],
        "n_quantize": facts["n_quantize"],
        "n_dequantize": facts["n_dequantize"],
    }


def summary(model_or_path) -> dict:
    from edgeus.quantize.checker import qdq_facts

    model = load(model_or_path)
    facts = qdq_facts(model)
    q = quantized_nodes(model)
    ops: dict[str, int] = {}
    for v in q.values():
        ops[v] = ops.get(v, 0) + 1
    facts = {k: (sorted(v) if isinstance(v, set) else v) for k, v in facts.items()}
    return {"quantized_nodes": len(q), "quantized_by_op": dict(sorted(ops.items())), **facts}


__all__ = ["QDQLayout", "quantize_model", "float_elementwise", "CPU_OP_TYPES", "bypass_qdq", "quantized_nodes", "fallback_candidates",
           "layout_signature", "summary", "ort_arguments", "calibration_method", "LAYOUTS"]
