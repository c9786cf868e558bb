"""Will TensorRT's ONNX parser take this model? Checked on the CPU, before the device sees it.

Three families of rules:

* operators: the support matrix of the TensorRT 10 ONNX parser (onnx-tensorrt ``docs/operators.md``,
  TensorRT 10.x: opsets 9 to 20 for 10.0-10.x as shipped on JetPack 6; 8.5/8.6 stop at opset 17),
  plus the restrictions of the operators our models use (Resize modes, pooling dilations, ...);
* shapes: every input dimension static except the batch (dimension 0), which the optimisation
  profile covers;
* Q/DQ layout: the rules of the quantisation issue (symmetric int8, zero point 0, ...), owned by
  ``edgeus.quantize.checker.check_tensorrt_qdq`` and called from here.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeus.deploy.versions import lower_bound

# Operators the TensorRT 10 ONNX parser supports (onnx-tensorrt docs/operators.md, "Supported: Y").
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos
Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand
EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero
Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu
Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Listed as supported only by recent TensorRT 10 releases (opset 23/24 operators).
RECENT_OPS = frozenset({"Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter"})

# Listed as not supported ("Supported: N"); the parser fails on them.
UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad
Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger
MaxRoiPool MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional
OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt
SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer
Unique
""".split())

MIN_OPSET = 9
# Highest ONNX opset the parser of a TensorRT release accepts (operators.md of each release).
MAX_OPSET = [((10, 0), 20), ((8, 6), 17), ((8, 5), 17), ((8, 4), 13), ((8, 0), 13)]

_RESIZE_COORD = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 16: "bfloat16"}


def max_opset(trt_version: tuple[int, ...] | None) -> int:
    if trt_version is None:
        return MAX_OPSET[0][1]
    for since, opset in MAX_OPSET:
        if tuple(trt_version[:2]) >= since:
            return opset
    return 13


@dataclass
class CompatReport:
    ok: bool = True
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    opset: int | None = None
    ops: dict[str, int] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    qdq_nodes: int = 0
    qdq_checked: bool = False

    def error(self, msg: str) -> None:
        self.errors.append(msg)
        self.ok = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(model_or_path):
    import onnx

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_file():
            from edgeus.errors import EdgeusError

            raise EdgeusError(f"ONNX model not found: {path}")
        try:
            return onnx.load(str(path))
        except Exception as e:
            from edgeus.errors import EdgeusError

            raise EdgeusError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0]}") from None
    return model_or_path


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def tensor_info(model) -> tuple[list[dict], list[dict]]:
    """Graph inputs and outputs: name, shape (str/None for dynamic dims), dtype."""
    inits = {i.name for i in model.graph.initializer}

    def info(vi):
        return {"name": vi.name, "shape": _dims(vi),
                "dtype": _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))}

    return ([info(v) for v in model.graph.input if v.name not in inits], [info(v) for v in model.graph.output])


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _restrictions(node, report: CompatReport) -> None:
    where = f"{node.op_type} node {node.name or '(unnamed)'}"
    if node.op_type == "Resize":
        mode = _attr(node, "mode", "nearest")
        coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
        if mode not in _RESIZE_MODES:
            report.error(f"{where}: mode {mode!r} unsupported by TensorRT (nearest, linear only)")
        if coord not in _RESIZE_COORD:
            report.error(f"{where}: coordinate_transformation_mode {coord!r} unsupported by TensorRT")
        if _attr(node, "antialias", 0):
            report.error(f"{where}: antialiasing is not supported by TensorRT")
    elif node.op_type in ("MaxPool", "AveragePool", "LpPool"):
        dil = _attr(node, "dilations")
        if dil and any(d != 1 for d in dil):
            report.error(f"{where}: dilated pooling is not supported by TensorRT")
        ks = _attr(node, "kernel_shape") or []
        if len(ks) not in (2, 3):
            report.error(f"{where}: only 2D or 3D pooling is supported by TensorRT")
        if node.op_type == "MaxPool" and len(node.output) > 1 and node.output[1]:
            report.error(f"{where}: the Indices output of MaxPool is not supported by TensorRT")
    elif node.op_type == "ScatterND" and _attr(node, "reduction", "none") != "none":
        report.error(f"{where}: ScatterND reduction is not supported by TensorRT")
    elif node.op_type == "TopK" and _attr(node, "sorted", 1) != 1:
        report.error(f"{where}: TopK must be sorted for TensorRT")


def check_onnx(model_or_path, target=None, *, check_qdq: bool | None = None) -> CompatReport:
    """Check an ONNX model against TensorRT's ONNX parser and our Q/DQ rules.

    ``target`` is a TargetConfig (or dict) whose ``tensorrt`` range picks the opset limit.
    ``check_qdq``: run the quantiser's Q/DQ rules (default: when the model has Q/DQ nodes).
    """
    model = load_model(model_or_path)
    report = CompatReport()
    tget = (lambda k, d=None: (target.get(k, d) if isinstance(target, dict) else getattr(target, k, d))) \
        if target is not None else (lambda k, d=None: d)
    trt_low = lower_bound(tget("tensorrt"))

    # opset and domains
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    report.opset = opsets.get("ai.onnx")
    limit = max_opset(trt_low)
    if report.opset is None:
        report.error("the model imports no default ONNX opset")
    elif report.opset < MIN_OPSET or report.opset > limit:
        trt_txt = ".".join(map(str, trt_low)) if trt_low else "10"
        report.error(f"opset {report.opset} is outside what TensorRT {trt_txt} parses ({MIN_OPSET}..{limit}); "
                     f"re-export with export.opset={min(max(report.opset, MIN_OPSET), limit)}")

    # operators
    counts = Counter()
    for node in model.graph.node:
        domain = node.domain or "ai.onnx"
        counts[node.op_type if domain == "ai.onnx" else f"{domain}::{node.op_type}"] += 1
        if domain != "ai.onnx":
            report.error(f"{node.op_type} node {node.name or '(unnamed)'}: operator domain {domain!r} "
                         "(an ONNX Runtime contrib op) has no TensorRT parser support without a plugin")
            continue
        if node.op_type in UNSUPPORTED_OPS:
            report.error(f"{node.op_type} node {node.name or '(unnamed)'}: not supported by the TensorRT ONNX parser")
        elif node.op_type in RECENT_OPS:
            report.warnings.append(f"{node.op_type}: only recent TensorRT 10 releases parse it; check the device's version")
        elif node.op_type not in SUPPORTED_OPS:
            report.error(f"{node.op_type} node {node.name or '(unnamed)'}: not in TensorRT 10's ONNX operator support matrix")
        else:
            _restrictions(node, report)
    report.ops = dict(sorted(counts.items()))

    # shapes: static except the batch
    report.inputs, report.outputs = tensor_info(model)
    if not report.inputs:
        report.error("the model has no inputs")
    for t in report.inputs:
        dims = t["shape"]
        if not dims:
            report.error(f"input {t['name']}: no static shape; export with a fixed C, H, W")
            continue
        bad = [i for i, d in enumerate(dims) if i > 0 and not (isinstance(d, int) and d > 0)]
        if bad:
            report.error(f"input {t['name']}: dimension(s) {bad} of {dims} are dynamic; only the batch "
                         "(dimension 0) may be dynamic for the optimisation profile")
        if t["dtype"] not in ("float32", "float16"):
            report.warnings.append(f"input {t['name']}: dtype {t['dtype']} (float32 expected for images)")
        b = dims[0]
        bmax = (tget("batch") or {}).get("max") if isinstance(tget("batch"), dict) else getattr(tget("batch"), "max", None)
        if isinstance(b, int) and b > 0 and bmax and bmax > b:
            report.warnings.append(f"input {t['name']}: static batch {b}, but the target's profile goes to "
                                   f"batch {bmax}; the engine will run batch {b} only (export with a dynamic batch)")
    for t in report.outputs:
        if any(not (isinstance(d, int) and d > 0) for d in t["shape"][1:]):
            report.warnings.append(f"output {t['name']}: non-batch dimensions {t['shape']} are not static")

    for init in model.graph.initializer:
        if init.data_type in (11,):  # float64
            report.warnings.append(f"initializer {init.name}: float64 will be cast down to float32 by TensorRT")

    # Q/DQ
    report.qdq_nodes = counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0)
    precision = (tget("precision") or "").lower()
    if precision == "int8" and report.qdq_nodes == 0:
        report.warnings.append("target precision is int8 but the model has no Q/DQ nodes: TensorRT 10 builds "
                               "INT8 only from explicit quantisation; quantise it first (edgeus quantize)")
    if check_qdq is None:
        check_qdq = report.qdq_nodes > 0
    if check_qdq:
        try:
            from edgeus.quantize.checker import check_tensorrt_qdq
        except ImportError:
            report.warnings.append("Q/DQ rules not checked: edgeus.quantize.checker is not available")
        else:
            for problem in check_tensorrt_qdq(model):
                report.error(f"Q/DQ: {problem}")
            report.qdq_checked = True
    return report
