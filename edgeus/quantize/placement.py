"""TensorRT-correct Q/DQ placement: weighted-op inputs and residual-add inputs only.

NVIDIA's explicit-quantisation guidance (TensorRT developer guide, "Q/DQ layer placement"; the
same rule as ModelOpt's ``build_non_residual_input_map``):

* Q/DQ on the inputs of Conv, ConvTranspose, Gemm and MatMul (weights per output channel);
* on a *residual* Add - two activation inputs, one of which comes from a convolution backbone
  (Conv [-> BatchNormalization] [-> Relu ...]) - Q/DQ on the other (skip) input only, so that
  TensorRT fuses the add into the convolution's epilogue; when both inputs come from different
  convolutions, the skip is the input nearer to their common ancestor;
* nothing on normalisation internals (ReduceMean, Pow, Sqrt, Div, LayerNorm's affine Mul/Add),
  on adds of a constant (bias, eps), on adds of two non-convolution branches (Slice + Slice,
  Mul + Mul), on slice/concat-only paths, or on the logits output.

ONNX Runtime's quantiser places the weighted-op inputs (``op_types_to_quantize`` without Add);
:func:`residual_add_inputs` finds the skip inputs and :func:`insert_input_qdq` gives each its own
symmetric int8 Q/DQ pair from the calibrated ranges. :func:`placement_problems` checks a model.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BACKBONE = ("Conv", "ConvTranspose")
# ops TensorRT fuses between a convolution and a following add (ModelOpt's fusible backbone paths)
FUSIBLE = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Identity", "MaxPool"}
NORM_INTERNALS = {"ReduceMean", "Pow", "Sqrt", "Div", "Reciprocal", "LayerNormalization", "GroupNormalization",
                  "InstanceNormalization", "ReduceSumSquare", "ReduceL2"}
QDQ = ("QuantizeLinear", "DequantizeLinear")


class _G:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.const = {t.name for t in g.initializer}
        self.const |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.producer = {o: n for n in g.node for o in n.output}
        self.inputs = {i.name for i in g.input} - self.const
        self.outputs = {o.name for o in g.output}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def is_const(self, t: str) -> bool:
        if t in self.const:
            return True
        p = self.producer.get(t)
        return p is not None and p.op_type in QDQ and self.is_const(p.input[0])

    def through_qdq(self, t: str) -> str:
        """The float tensor behind a Q -> DQ pair (or ``t``)."""
        p = self.producer.get(t)
        if p is not None and p.op_type == "DequantizeLinear":
            q = self.producer.get(p.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return t

    def backbone(self, t: str) -> onnx.NodeProto | None:
        """The convolution a tensor comes from through fusible ops (Add/Mul of a constant: bias, scale)."""
        seen = 0
        while seen < 16:
            seen += 1
            p = self.producer.get(self.through_qdq(t))
            if p is None:
                return None
            if p.op_type in BACKBONE:
                return p
            acts = [i for i in p.input if i and not self.is_const(i)]
            if p.op_type in FUSIBLE or (p.op_type in ("Add", "Mul") and len(acts) == 1):
                if not acts:
                    return None
                t = acts[0]
                continue
            return None
        return None

    def ancestors(self, t: str) -> dict[str, int]:
        """{node name: distance} of the nodes ``t`` depends on (breadth first)."""
        out: dict[str, int] = {}
        todo = deque([(t, 0)])
        while todo:
            name, d = todo.popleft()
            p = self.producer.get(name)
            if p is None or p.name in out:
                continue
            out[p.name] = d
            for i in p.input:
                if i and i not in self.const:
                    todo.append((i, d + 1))
        return out


def residual_add_inputs(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """(Add node name, input index) of the skip input of every residual Add (see the module doc)."""
    g = _G(model)
    out = []
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        a, b = n.input
        if g.is_const(a) or g.is_const(b) or a in g.inputs or b in g.inputs:
            continue
        ba, bb = g.backbone(a), g.backbone(b)
        if ba is None and bb is None:
            continue                      # Slice + Slice, Mul + Mul, LayerNorm affine ...: not residual
        if ba is not None and bb is not None:
            if ba.name == bb.name:
                continue
            anc_a, anc_b = g.ancestors(a), g.ancestors(b)
            common = set(anc_a) & set(anc_b)
            if not common:
                out.append((n.name, 1))
                continue
            lca = min(common, key=lambda k: anc_a[k] + anc_b[k])
            # the input on the longer path to the common ancestor is the main branch (fused); the other is the skip
            out.append((n.name, 1 if anc_a[lca] >= anc_b[lca] else 0))
            continue
        conv, skip = (ba, 1) if ba is not None else (bb, 0)
        if conv.name in g.ancestors(n.input[skip]):
            continue                      # the "skip" derives from the same convolution (ConvNeXt-like): not residual
        out.append((n.name, skip))
    return out


def _read_ranges(ranges_cache) -> dict[str, tuple[float, float]]:
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(ranges_cache)
    return {k: (float(np.asarray(v.range_value[0]).min()), float(np.asarray(v.range_value[1]).max()))
            for k, v in data.data.items()}


def insert_input_qdq(model: onnx.ModelProto, targets: list[tuple[str, int]], ranges_cache) -> list[str]:
    """Give each (node, input index) its own symmetric int8 Q -> DQ pair (scale amax / 127, zero point 0).

    Returns the tensors quantised; a tensor without a calibrated range is left in float.
    """
    ranges = _read_ranges(ranges_cache)
    nodes = {n.name: n for n in model.graph.node}
    done = []
    new_nodes: dict[str, list] = {}
    for name, idx in targets:
        node = nodes[name]
        t = node.input[idx]
        if t not in ranges:
            continue
        lo, hi = ranges[t]
        amax = max(abs(lo), abs(hi))
        scale = amax / 127.0 if amax > 0 else 1.0 / 127.0
        base = f"{t}_{name}_res"
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), base + "_scale"),
                                        numpy_helper.from_array(np.array(0, np.int8), base + "_zero_point")])
        q = helper.make_node("QuantizeLinear", [t, base + "_scale", base + "_zero_point"], [base + "_q"],
                             name=base + "_QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [base + "_q", base + "_scale", base + "_zero_point"],
                              [base + "_dq"], name=base + "_DequantizeLinear")
        node.input[idx] = base + "_dq"
        new_nodes.setdefault(name, []).extend([q, dq])
        done.append(t)
    if new_nodes:                          # keep the node list topologically sorted: pairs right before their add
        ordered = []
        for n in model.graph.node:
            ordered.extend(new_nodes.get(n.name, []))
            ordered.append(n)
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return done


def detach_float_consumers(model: onnx.ModelProto, residual: list[tuple[str, int]]) -> int:
    """Feed every consumer of an activation DequantizeLinear that is neither a weighted op nor a residual
    skip input the float tensor behind its Q -> DQ instead (ONNX Runtime shares one pair between a
    quantised Conv and, e.g., a Concat reading the same tensor). Returns how many inputs were rewired."""
    g = _G(model)
    allowed = set(residual)
    n_rewired = 0
    for n in model.graph.node:
        if n.op_type in WEIGHTED or n.op_type in QDQ:
            continue
        for i, t in enumerate(n.input):
            p = g.producer.get(t)
            if p is None or p.op_type != "DequantizeLinear" or g.is_const(p.input[0]):
                continue
            if n.op_type == "Add" and (n.name, i) in allowed:
                continue
            src = g.through_qdq(t)
            if src != t:
                n.input[i] = src
                n_rewired += 1
    return n_rewired


def placement_problems(model_or_path) -> list[str]:
    """Q/DQ where TensorRT's placement rules say none: a DQ'd activation feeding anything but a weighted
    op or the skip input of a residual Add, Q/DQ on normalisation internals, a DQ producing a graph output."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    g = _G(model)
    allowed_adds = set(residual_add_inputs(_strip_qdq(model)))
    problems = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or g.is_const(n.input[0]):
            continue
        if n.output[0] in g.outputs:
            problems.append(f"DequantizeLinear '{n.name}' produces the graph output '{n.output[0]}' (logits stay float)")
        for c in g.consumers.get(n.output[0], []):
            if c.op_type in WEIGHTED:
                continue
            if c.op_type == "Add":
                idx = list(c.input).index(n.output[0])
                if (c.name, idx) in allowed_adds:
                    continue
                problems.append(f"Q/DQ on input {idx} of Add '{c.name}', which is not the skip input of a residual add")
            elif c.op_type in NORM_INTERNALS:
                problems.append(f"Q/DQ on normalisation internals: {c.op_type} '{c.name}'")
            else:
                problems.append(f"Q/DQ feeding {c.op_type} '{c.name}' (only Conv/Gemm/MatMul and residual-add inputs)")
    return problems


def _strip_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every activation Q -> DQ pair bypassed (to find residual adds as in the float model)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = _G(m)
    for n in m.graph.node:
        for i, t in enumerate(n.input):
            if t and not g.is_const(t):
                n.input[i] = g.through_qdq(t)
    return m


def count_qdq(model_or_path) -> dict:
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    q = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in model.graph.node)
    return {"quantize": q, "dequantize": dq}


__all__ = ["residual_add_inputs", "insert_input_qdq", "detach_float_consumers", "placement_problems", "count_qdq", "WEIGHTED", "NORM_INTERNALS"]
