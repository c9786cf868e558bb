"""INT8 quantisation: calibration sets, target layouts, TensorRT checker, fallback, QAT."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import make_cfg
from edgeus.config import compose
from edgeus.errors import EdgeusError
from edgeus.onnx.export import export_onnx as _export_onnx
from edgeus.onnx.export import parity_sample, target_opset
from edgeus.onnx.session import run_logits
from edgeus.quantize import QATSetup, QDQLayout, check_tensorrt_qdq, inputs_from_bundle, quantize_onnx
from edgeus.quantize import calibration as C
from edgeus.quantize import qdq
from edgeus.quantize.fallback import Quantiser

# INT8 must agree with FP32 on at least this fraction of the phantom's validation images
MIN_TOP1_AGREEMENT = 0.9
TRT = "jetson_orin_nano"


def _cfg(*extra):
    return make_cfg("data.n_per_class=30", "data.image_size=32", "data.augment=false", "data.batch_size=16",
                    "quantize.num_images=48", *extra, tiny=False)


def export_onnx(model, path, cfg, bundle):
    sample, source = parity_sample(bundle.val, int(cfg.export.parity_samples))
    return _export_onnx(model, path, cfg.export, preprocessing=dict(bundle.preprocessing), classes=list(bundle.classes),
                        sample=sample, sample_source=source, target_opset=target_opset(cfg.target), seed=int(cfg.seed))


def quantize(src, out, cfg, bundle, model=None, **kw):
    """quantize_onnx as the pipeline composes it: its section, the target's layout, data and QAT injected."""
    qat = None
    if model is not None:
        from edgeus.finetune import make_finetuner

        qat = QATSetup(model, finetune=lambda fp32: make_finetuner(cfg, bundle, teacher=fp32),
                       export=lambda m, p: export_onnx(m, p, cfg, bundle))
    return quantize_onnx(src, out, cfg.quantize, layout=QDQLayout.from_target(cfg.target), target=cfg.target.name,
                         **inputs_from_bundle(bundle, cfg.quantize), qat=qat, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A simple_cnn trained on the phantom to well above chance, and its FP32 ONNX."""
    from edgeus.data import build_datasets, build_loaders

    cfg = _cfg()
    bundle = build_datasets(cfg.data)
    loaders = build_loaders(bundle, cfg.data)
    torch.manual_seed(0)
    model = __import__("edgeus.models", fromlist=["create_model"]).create_model("simple_cnn", width=0.5)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(10):
        model.train()
        for b in loaders["train"]:
            loss = torch.nn.functional.cross_entropy(model(b["image"]), b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("q")
    export_onnx(model, d / "fp32.onnx", cfg, bundle)
    return model, bundle, d


def _agreement(a, b, x):
    return float((run_logits(a, x).argmax(1) == run_logits(b, x).argmax(1)).mean())


# ------------------------------------------------------------------------------ calibration


def test_calibration_never_touches_val_or_test(trained, monkeypatch, tmp_path):
    _, bundle, d = trained

    # val, test and train_plain share one Dataset class: guard by identity
    orig = type(bundle.val).__getitem__
    held = {id(bundle.val), id(bundle.test)}

    def guarded(self, i):
        assert id(self) not in held, "calibration read a val/test image"
        return orig(self, i)

    monkeypatch.setattr(type(bundle.val), "__getitem__", guarded)
    spec = C.load_spec("default", {"num_images": 0})
    cs = C.build_calibration_set(bundle, spec)
    C.compute_ranges(d / "fp32.onnx", cs, tmp_path / "r.json")
    train = set(bundle.ids("train"))
    assert set(cs.ids) == train
    assert not set(cs.ids) & (set(bundle.ids("val")) | set(bundle.ids("test")))


def test_calibration_spec_refuses_other_splits(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: val\nnum_images: 8\n")
    with pytest.raises(EdgeusError, match="train split only"):
        C.load_spec(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("split: train\nnum_imgs: 8\n")
    with pytest.raises(EdgeusError, match="unknown key"):
        C.load_spec(str(typo))


def test_calibration_set_is_balanced_and_reproducible(trained, tmp_path):
    _, bundle, _ = trained
    spec = C.load_spec("default", {"num_images": 30})
    a, b = C.build_calibration_set(bundle, spec), C.build_calibration_set(bundle, spec)
    assert a.sha256 == b.sha256 and a.ids == b.ids
    assert a.counts(3) == [10, 10, 10]  # 18 train images per class
    spec.seed = 1
    assert C.build_calibration_set(bundle, spec).sha256 != a.sha256
    text = a.write_file_list(tmp_path / "files.txt").read_text()
    assert a.sha256 in text and all(i in text for i in a.ids)
    # preprocessing identical to inference: the same tensors the train_plain split yields
    i = bundle.ids("train_plain").index(a.ids[0])
    np.testing.assert_array_equal(a.images[0], bundle.train_plain[i]["image"].numpy())


def test_tensorrt_calibration_cache_format(tmp_path):
    path = C.write_tensorrt_cache({"input": (-2.54, 1.0), "conv_out": (0.0, 12.7)}, tmp_path / "c.cache", "8602")
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8602-EntropyCalibration2"
    assert lines[1].startswith("conv_out: ") and len(lines[1].split(": ")[1]) == 8
    header, scales = C.read_tensorrt_cache(path)
    assert scales["input"] == pytest.approx(2.54 / 127, rel=1e-6)
    assert scales["conv_out"] == pytest.approx(0.1, rel=1e-6)


# ------------------------------------------------------------------------------ layouts


def test_layout_comes_from_the_target():
    assert qdq.QDQLayout.from_target(compose([]).target).layout == "onnxruntime"      # empty quant: cpu
    cfg = compose([])
    cfg.target.quant = {}
    lay = qdq.QDQLayout.from_target(cfg.target)
    assert (lay.activation_type, lay.activation_symmetric, lay.quantize_bias) == ("uint8", False, True)
    trt = qdq.QDQLayout.from_target(compose([f"target={TRT}"]).target)
    assert (trt.layout, trt.activation_type, trt.activation_symmetric, trt.quantize_bias) == ("tensorrt", "int8", True, False)
    with pytest.raises(EdgeusError, match="symmetric"):
        qdq.QDQLayout.from_target({"layout": "tensorrt", "activation_symmetric": False})
    with pytest.raises(EdgeusError, match="unknown key"):
        qdq.QDQLayout.from_target({"layout": "onnxruntime", "activation_typ": "int8"})


@pytest.fixture(scope="module")
def ptq(trained):
    _, bundle, d = trained
    out = {}
    for name, target in (("cpu", "cpu"), ("trt", TRT)):
        cfg = _cfg(f"target={target}")
        out[name] = quantize(d / "fp32.onnx", d / f"{name}.int8.onnx", cfg, bundle)
    return out


def test_int8_runs_in_onnxruntime_and_agrees_with_fp32(trained, ptq):
    _, bundle, d = trained
    x = np.stack([bundle.val[i]["image"].numpy() for i in range(len(bundle.val))])
    fp32_acc = ptq["cpu"]["metrics"]["fp32"]["accuracy"]
    assert fp32_acc > 0.6                                       # the model learned the phantom
    for name in ("cpu", "trt"):
        assert _agreement(d / "fp32.onnx", d / f"{name}.int8.onnx", x) >= MIN_TOP1_AGREEMENT
        r = ptq[name]
        assert r["calibration"]["n"] == 48 and len(r["calibration"]["sha256"]) == 64
        assert r["metrics_final"]["n"] == len(bundle.val)


def test_cpu_layout_is_uint8_asymmetric_and_tensorrt_layout_passes_the_checker(trained, ptq):
    _, _, d = trained
    cpu = ptq["cpu"]["qdq"]
    assert cpu["activation_dtypes"] == ["uint8"] and cpu["weight_dtypes"] == ["int8"]
    assert cpu["per_channel_weights"] > 0 and cpu["int32_dequantize"] > 0
    assert check_tensorrt_qdq(d / "cpu.int8.onnx")              # not TensorRT's layout
    trt = ptq["trt"]["qdq"]
    assert trt["activation_dtypes"] == ["int8"] and trt["all_zero_points_zero"]
    assert trt["per_tensor_weights"] == 0 and trt["per_channel_weights"] >= 9 and trt["int32_dequantize"] == 0
    assert check_tensorrt_qdq(d / "trt.int8.onnx", require_qdq=True) == []
    assert ptq["trt"]["tensorrt_check"] == []
    # inputs of Conv/Gemm quantised, their outputs not (TensorRT fuses DQ -> Conv -> Q itself)
    assert set(qdq.quantized_nodes(d / "trt.int8.onnx").values()) <= {"Conv", "Gemm", "Add", "MatMul"}
    header, scales = C.read_tensorrt_cache(ptq["trt"]["calibration"]["tensorrt_cache"])
    assert header.startswith("TRT-") and "input" in scales and all(s > 0 for s in scales.values())


class LayerNormResidual(torch.nn.Module):
    """Conv -> hand-written LayerNorm (ReduceMean, Sub, Pow, Add eps, Sqrt, Div, affine Mul/Add) -> Conv,
    a residual add (conv branch + skip), a Slice + Slice add and a Mul + Mul add (neither residual)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.g, self.beta = torch.nn.Parameter(torch.rand(8) + 0.5), torch.nn.Parameter(torch.rand(8) - 0.5)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.a(x))
        mu = y.mean(1, keepdim=True)
        var = (y - mu).pow(2).mean(1, keepdim=True)
        n = (y - mu) / torch.sqrt(var + 1e-5) * self.g[None, :, None, None] + self.beta[None, :, None, None]
        z = self.b(n) + y                                   # residual: the conv branch fuses, the skip y is quantised
        s = z[:, :4] + z[:, 4:]                             # slice + slice: not residual
        m = torch.sigmoid(s) * s + s * 0.5                  # mul + mul: not residual
        return self.fc(torch.cat([m, s], 1).mean((2, 3)))


def test_tensorrt_placement_skips_normalisation_and_quantises_the_residual_skip(tmp_path):
    from edgeus.data import build_datasets
    from edgeus.quantize.placement import NORM_INTERNALS, placement_problems

    cfg = make_cfg("data.n_per_class=6", "data.image_size=16", f"target={TRT}", "quantize.num_images=9",
                   "quantize.fallback=none", "quantize.qat=false", tiny=False)
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    export_onnx(LayerNormResidual().eval(), tmp_path / "r.onnx", cfg, bundle)
    r = quantize(tmp_path / "r.onnx", tmp_path / "r.int8.onnx", cfg, bundle)
    m = onnx.load(str(tmp_path / "r.int8.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    fed_by_dq = {c.op_type for n in m.graph.node if n.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], [])}
    assert fed_by_dq == {"Conv", "Gemm", "Add"}                 # weighted ops and the one residual add only
    assert not fed_by_dq & (NORM_INTERNALS | {"Sub", "Mul", "Slice", "Concat", "Sigmoid", "GlobalAveragePool"})
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    quantised_adds = [n for n in adds if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                             for i in n.input)]
    assert len(quantised_adds) == 1                              # not eps, affine, slice+slice, mul+mul
    res = quantised_adds[0]
    kinds = sorted(producer[i].op_type for i in res.input)
    assert kinds == ["Conv", "DequantizeLinear"]                 # conv branch straight in, skip through Q/DQ
    skip_q = producer[producer[next(i for i in res.input if producer[i].op_type == "DequantizeLinear")].input[0]]
    assert producer[skip_q.input[0]].op_type == "Relu"           # the skip is y = relu(conv a)
    assert producer[m.graph.output[0].name].op_type == "Gemm"    # logits stay float
    assert placement_problems(m) == [] and check_tensorrt_qdq(m, require_qdq=True, placement=True) == []
    assert r["tensorrt_check"] == []


def test_placement_checker_flags_qdq_on_normalisation_internals(tmp_path, monkeypatch):
    """The old layout (Q/DQ on both inputs of every Add) is what the placement rules reject."""
    from edgeus.data import build_datasets
    from edgeus.quantize import placement
    from edgeus.quantize.placement import placement_problems

    monkeypatch.setattr(placement, "detach_float_consumers", lambda model, residual: 0)   # as before this change
    cfg = make_cfg("data.n_per_class=6", "data.image_size=16", f"target={TRT}", "quantize.num_images=9", tiny=False)
    bundle = build_datasets(cfg.data)
    export_onnx(LayerNormResidual().eval(), tmp_path / "r.onnx", cfg, bundle)
    data = inputs_from_bundle(bundle, cfg.quantize)
    lay = QDQLayout.from_target(cfg.target)
    lay.op_types, lay.residual_qdq = ["Conv", "Gemm", "MatMul", "Add"], False     # every Add quantised, as before
    out = tmp_path / "old.int8.onnx"
    out.write_bytes(b"an older model under the final name")
    with pytest.raises(EdgeusError, match="normalisation internals: ReduceMean"):
        quantize_onnx(tmp_path / "r.onnx", out, cfg.quantize, layout=lay, recovery=False,
                      calibration=data["calibration"], evaluation=data["evaluation"], target="old")
    # a failed quantise leaves nothing under the final name (and no temporary file beside it)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".old.int8.onnx")]
    # the same layout checked directly
    lay.residual_qdq = None
    from edgeus.quantize.fallback import Quantiser as Q

    work = tmp_path / "old.quant"
    Q(work / "fp32.pre.onnx", lay, work / "ranges.json", "minmax")(tmp_path / "raw.onnx")
    problems = placement_problems(tmp_path / "raw.onnx")
    assert any("not the skip input of a residual add" in p for p in problems), problems
    assert any("Pow" in p or "ReduceMean" in p for p in problems), problems


# ------------------------------------------------------------------------------ checker on bad models


def _model(zp_dtype=TensorProto.INT8, zp_value=0, w_scale_per_channel=True, opset=17, bias_int32=False,
           act_axis_scale=False):
    """input -> Q/DQ -> Conv(DQ(int8 weight)) -> output; knobs break one TensorRT rule each."""
    np_zp = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}[zp_dtype]
    c = 2 if act_axis_scale else 1
    w = numpy_helper.from_array(np.ones((4, c, 3, 3), np.int8), "w_q")
    ws = numpy_helper.from_array(np.full((4,) if w_scale_per_channel else (), 0.01, np.float32), "w_s")
    wz = numpy_helper.from_array(np.zeros((4,) if w_scale_per_channel else (), np.int8), "w_z")
    xs = numpy_helper.from_array(np.full((c,) if act_axis_scale else (), 0.02, np.float32), "x_s")
    xz = numpy_helper.from_array(np.array(zp_value, np_zp) if not act_axis_scale else np.zeros((c,), np_zp), "x_z")
    inits = [w, ws, wz, xs, xz]
    nodes = [helper.make_node("QuantizeLinear", ["input", "x_s", "x_z"], ["xq"], name="q_in", **({"axis": 1} if act_axis_scale else {})),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xdq"], name="dq_in", **({"axis": 1} if act_axis_scale else {})),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="dq_w", axis=0)]
    conv_in = ["xdq", "w"]
    if bias_int32:
        inits += [numpy_helper.from_array(np.zeros(4, np.int32), "b_q"), numpy_helper.from_array(np.full(4, 2e-4, np.float32), "b_s"),
                  numpy_helper.from_array(np.zeros(4, np.int32), "b_z")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"], name="dq_b", axis=0))
        conv_in.append("b")
    nodes.append(helper.make_node("Conv", conv_in, ["output"], name="conv", pads=[1, 1, 1, 1]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, c, 8, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_accepts_a_good_model():
    assert check_tensorrt_qdq(_model(), require_qdq=True) == []


@pytest.mark.parametrize("kwargs, needle", [
    ({"zp_value": 3}, "non-zero zero point"),
    ({"zp_dtype": TensorProto.UINT8}, "uint8"),
    ({"w_scale_per_channel": False}, "per-tensor weight"),
    ({"opset": 12}, "opset 12 < 13"),
    ({"bias_int32": True}, "int32"),
    ({"act_axis_scale": True}, "per-channel scale on activation"),
])
def test_checker_rejects_bad_models(kwargs, needle):
    problems = check_tensorrt_qdq(_model(**kwargs))
    assert any(needle in p for p in problems), problems


def test_checker_flags_fp32_when_qdq_is_required(trained):
    _, _, d = trained
    assert check_tensorrt_qdq(d / "fp32.onnx") == []
    assert any("no QuantizeLinear" in p for p in check_tensorrt_qdq(d / "fp32.onnx", require_qdq=True))


# ------------------------------------------------------------------------------ fallback


@pytest.mark.parametrize("layout", ["cpu", "trt"])
def test_fallback_removes_exactly_the_listed_nodes(trained, ptq, layout, tmp_path):
    _, _, d = trained
    work = d / f"{layout}.quant"
    lay = qdq.QDQLayout.from_target(compose([f"target={'cpu' if layout == 'cpu' else TRT}"]).target)
    q = Quantiser(work / "fp32.pre.onnx", lay, work / "ranges.json", "minmax")
    full = qdq.quantized_nodes(d / f"{layout}.int8.onnx")
    cands = list(qdq.fallback_candidates(d / f"{layout}.int8.onnx"))
    for excluded in (cands[:1], [cands[1], cands[-1]]):
        out = q(tmp_path / "fb.onnx", exclude=excluded)
        assert set(full) - set(qdq.quantized_nodes(out)) == set(excluded)
        assert set(qdq.quantized_nodes(out)) <= set(full)


def test_fallback_search_is_recorded_in_the_report(trained, tmp_path):
    _, bundle, d = trained
    # a tolerance no model meets forces the whole search; QAT off
    cfg = _cfg("quantize.max_accuracy_drop=-1.0", "quantize.max_fallback_nodes=2", "quantize.qat=false")
    r = quantize(d / "fp32.onnx", tmp_path / "f.int8.onnx", cfg, bundle)
    fb = r["fallback"]
    assert len(fb["steps"]) == 2 and fb["candidates"] >= 9
    sens = [row["sensitivity"] for row in fb["ranking"]]
    assert sens == sorted(sens, reverse=True)
    assert [s["node"] for s in fb["steps"]] == [row["node"] for row in fb["ranking"][:2]]
    assert not r["within_tolerance"] and r["qat"] is None
    kept = [e["node"] for e in r["excluded_nodes"]]
    assert not set(kept) & set(qdq.quantized_nodes(tmp_path / "f.int8.onnx"))


# ------------------------------------------------------------------------------ QAT


def test_qat_exports_the_ptq_layout(trained, ptq, tmp_path):
    model, bundle, d = trained
    cfg = _cfg(f"target={TRT}", "quantize.qat=true", "quantize.qat_epochs=1", "train.max_steps_per_epoch=3")
    r = quantize(d / "fp32.onnx", tmp_path / "qat.int8.onnx", cfg, bundle, model=model)
    assert r["method"] == "qat" and r["qat"]["ranges_applied"] == r["qat"]["fake_quant_layers"] > 0
    assert r["qat"]["ranges_unmatched"] == [] and r["qat"]["with_teacher"]          # structural match, KD from FP32
    assert r["qat"]["trainer"].startswith("edgeus.train.fit") and len(r["qat"]["history"]) == 1
    assert check_tensorrt_qdq(tmp_path / "qat.int8.onnx", require_qdq=True) == []
    assert qdq.layout_signature(tmp_path / "qat.int8.onnx") == qdq.layout_signature(d / "trt.int8.onnx")
    x = np.stack([bundle.val[i]["image"].numpy() for i in range(len(bundle.val))])
    assert _agreement(d / "fp32.onnx", tmp_path / "qat.int8.onnx", x) >= MIN_TOP1_AGREEMENT


# ------------------------------------------------------------------------------ ISA-aware CPU layout

AVX2_HOST = "processor: 0\nflags\t\t: fpu sse2 ssse3 sse4_1 fma avx avx2 avx512f avx512bw\n"
VNNI_HOST = "processor: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512_vnni\n"
AVXVNNI_HOST = "processor: 0\nflags\t\t: fpu sse2 avx avx2 avx_vnni\n"
ARM_DOT = "processor: 0\nFeatures\t: fp asimd evtstrm aes crc32 asimddp\n"
ARM_NEON = "processor: 0\nFeatures\t: fp asimd evtstrm\n"


def test_host_isa_is_read_from_cpuinfo():
    from edgeus.quantize import isa

    assert isa.parse_cpuinfo(AVX2_HOST, "x86_64")["isa"] == isa.X86_AVX2
    assert isa.parse_cpuinfo(VNNI_HOST, "x86_64")["int8_dot"] == "avx512_vnni"
    assert isa.parse_cpuinfo(AVXVNNI_HOST, "x86_64")["isa"] == isa.X86_VNNI
    assert isa.parse_cpuinfo("flags : avx2 amx_tile amx_int8\n", "x86_64")["isa"] == isa.X86_VNNI
    assert isa.parse_cpuinfo(ARM_DOT, "aarch64")["isa"] == isa.ARM_DOTPROD
    assert isa.parse_cpuinfo(ARM_NEON, "aarch64")["isa"] == isa.ARM_NEON
    host = isa.detect_host()                                   # this machine, whatever it is
    assert host["isa"] in isa.ISAS + ("unknown",) and host["kernels"]


def test_targets_state_their_isa_and_the_cpu_layout_cannot_saturate():
    from edgeus.quantize import isa

    cpu = QDQLayout.from_target(compose(["target=cpu"]).target)
    vnni = QDQLayout.from_target(compose(["target=cpu_vnni"]).target)
    trt = QDQLayout.from_target(compose([f"target={TRT}"]).target)
    assert (cpu.isa, cpu.reduce_range, isa.can_saturate(cpu)) == (isa.X86_AVX2, True, False)
    assert (vnni.isa, vnni.reduce_range, isa.can_saturate(vnni)) == (isa.X86_VNNI, False, True)
    assert isa.target_isa(trt) == isa.TENSORRT
    with pytest.raises(EdgeusError, match="quant.isa"):
        QDQLayout.from_target({"layout": "onnxruntime", "isa": "avx9000"})


@pytest.mark.parametrize("host, target, mode, warns", [
    (AVX2_HOST, "cpu", "native", []),                               # 7-bit weights: no saturation anywhere
    (VNNI_HOST, "cpu", "native", []),
    (VNNI_HOST, "cpu_vnni", "native", []),                          # the target's own kernels
    (AVX2_HOST, "cpu_vnni", "simulated", ["would saturate"]),        # host saturates, target does not
    (AVX2_HOST, TRT, "simulated", ["TensorRT"]),
    (VNNI_HOST, TRT, "simulated", ["TensorRT"]),
])
def test_evaluation_plan_measures_what_the_target_computes(host, target, mode, warns):
    from edgeus.quantize import isa

    lay = QDQLayout.from_target(compose([f"target={target}"]).target)
    plan = isa.evaluation_plan(lay, isa.parse_cpuinfo(host, "x86_64"))
    assert plan["mode"] == mode and (plan["optimization"] == "disable") == (mode == "simulated")
    assert len(plan["warnings"]) == len(warns) and all(w in " ".join(plan["warnings"]) for w in warns)


def test_full_range_u8s8_for_a_non_vnni_target_warns_that_accuracy_will_not_hold():
    from edgeus.quantize import isa

    lay = QDQLayout.from_target({"layout": "onnxruntime", "isa": "x86_avx2", "reduce_range": False})
    plan = isa.evaluation_plan(lay, isa.parse_cpuinfo(VNNI_HOST, "x86_64"))
    text = " ".join(plan["warnings"])
    assert plan["mode"] == "simulated" and "saturates" in text and "will NOT hold" in text


def _saturation_model(tmp_path):
    """Gemm classifier over non-negative features: class A reads 16 features in adjacent pairs (weight 1, 1),
    class B reads 16 features spread out (weight 1, 0): same FP32 evidence, but only A's pairs can overflow int16."""
    k = 48
    w = np.zeros((2, k), np.float32)
    w[0, :16] = 1.0
    w[1, 16:48:2] = 1.0
    x = np.full((40, k), 0.6, np.float32)
    x[:20, :16] = 1.0                     # class A images
    x[20:, 16:48:2] = 1.0                 # class B images
    y = np.repeat([0, 1], 20)
    lin = torch.nn.Linear(k, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.zero_()
    torch.onnx.export(lin.eval(), (torch.from_numpy(x[:1]),), str(tmp_path / "lin.onnx"), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
                      dynamo=False)
    return x, y


def _emulated_logits(path, x, saturate):
    """The Gemm's integer arithmetic as ONNX Runtime's U8S8 kernel does it, from the Q/DQ model's own tensors."""
    from edgeus.quantize.isa import vpmaddubsw_dot

    m = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    xdq, wdq = prod[gemm.input[0]], prod[gemm.input[1]]
    xs, xz = float(init[xdq.input[1]]), int(init[xdq.input[2]])
    wq, ws = init[wdq.input[0]].astype(np.int32), init[wdq.input[1]].astype(np.float64)
    bdq = prod[gemm.input[2]]
    bias = init[bdq.input[0]].astype(np.float64) * init[bdq.input[1]].astype(np.float64)
    xq = np.clip(np.round(x / xs) + xz, 0, 255).astype(np.int32)
    acc = vpmaddubsw_dot(xq, wq, saturate=saturate) - xz * wq.sum(1)[None, :]
    return acc * xs * ws[None, :] + bias[None, :], int(np.abs(wq).max())


def test_u8s8_saturation_collapses_full_range_weights_and_the_cpu_layout_avoids_it(tmp_path):
    """Host-independent: the collapse is emulated from the quantised model's integers (VPMADDUBSW adds two
    uint8 x int8 products into a saturating int16), so it shows on a VNNI machine as on an AVX2 one."""
    x, y = _saturation_model(tmp_path)
    spec = C.CalibrationSpec(num_images=0, batch_size=8)
    calib = C.CalibrationSet(x, y, [str(i) for i in range(len(x))], spec, "synthetic")
    C.compute_ranges(tmp_path / "lin.onnx", calib, tmp_path / "r.json")
    acc = {}
    for target in ("cpu_vnni", "cpu"):
        lay = QDQLayout.from_target(compose([f"target={target}"]).target)
        out = Quantiser(tmp_path / "lin.onnx", lay, tmp_path / "r.json", "minmax")(tmp_path / f"{target}.onnx")
        exact, wmax = _emulated_logits(out, x, saturate=False)
        sat, _ = _emulated_logits(out, x, saturate=True)
        # the emulation reads the model right: exact integer arithmetic is what ONNX Runtime's Q/DQ graph computes
        np.testing.assert_allclose(exact, run_logits(out, x, optimization="disable"), atol=1e-3)
        assert (exact.argmax(1) == y).all()
        acc[target] = float((sat.argmax(1) == y).mean())
        if target == "cpu":
            assert 2 * 255 * wmax <= 32767                      # 7-bit weights: a pair can never overflow int16
            np.testing.assert_array_equal(sat, exact)
    assert acc["cpu_vnni"] <= 0.5 and acc["cpu"] == 1.0         # class A collapses into B without VNNI


# ------------------------------------------------------------------------------ single channel, metadata, compress


def test_single_output_channel_weights_pass_the_checker(tmp_path):
    """A convolution with one output channel has one scale whether per tensor or per channel."""
    m = _model(w_scale_per_channel=False)
    w = next(t for t in m.graph.initializer if t.name == "w_q")
    w.CopyFrom(numpy_helper.from_array(np.ones((1, 1, 3, 3), np.int8), "w_q"))
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1
    assert check_tensorrt_qdq(m, require_qdq=True) == []
    assert any("per-tensor weight" in p for p in check_tensorrt_qdq(_model(w_scale_per_channel=False)))

    class OneChannel(torch.nn.Module):          # a pruned stem: conv1 keeps a single channel
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.ReLU())
            self.conv2 = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.conv2(self.conv1(x))).mean((2, 3)))

    from edgeus.data import build_datasets

    cfg = make_cfg("data.n_per_class=6", "data.image_size=16", f"target={TRT}", "quantize.num_images=9",
                   "quantize.fallback=none", "quantize.qat=false", tiny=False)
    bundle = build_datasets(cfg.data)
    export_onnx(OneChannel().eval(), tmp_path / "one.onnx", cfg, bundle)
    r = quantize(tmp_path / "one.onnx", tmp_path / "one.int8.onnx", cfg, bundle)
    assert r["tensorrt_check"] == [] and (tmp_path / "one.int8.onnx").is_file()


def test_isa_and_fidelity_are_recorded(trained, ptq):
    from edgeus.quantize.isa import isa_record

    _, bundle, d = trained
    for name in ("cpu", "trt"):
        r = ptq[name]
        assert r["isa"]["host_isa"] and r["isa"]["target_isa"] == ("x86_avx2" if name == "cpu" else "tensorrt")
        rec = isa_record(d / f"{name}.int8.onnx")              # what the bundle manifest records
        assert rec["target_isa"] == r["isa"]["target_isa"] and rec["host_isa"] == r["isa"]["host_isa"]
        fid = r["metrics"]["int8_ptq"]["fidelity"]
        n_train, n_val = len(bundle.train_plain), len(bundle.val)
        assert fid["n"] == 2 * n_train + n_val                  # train, val and one augmented view of each train image
        assert set(fid["by_source"]) == {"train", "val", "augmented"} and 0 <= fid["agreement"] <= 1
        assert set(fid["flips_per_class"]) == set(bundle.classes)
        assert "agreement" in r["ptq_check"] and "worst_flip_rate" in r["ptq_check"]


def test_fidelity_fails_a_model_that_val_accuracy_alone_would_pass():
    from edgeus.quantize.fallback import tolerance_check

    fp32 = {"accuracy": 0.9, "recall": {"a": 0.9, "b": 0.9}}
    int8 = {**fp32, "fidelity": {"n": 500, "agreement": 0.95, "worst_class": "b", "worst_flip_rate": 0.1}}
    assert tolerance_check(fp32, int8, 0.01, 0.02)["ok"]                       # val alone: identical
    chk = tolerance_check(fp32, int8, 0.01, 0.02, min_agreement=0.99, max_class_flip_rate=0.02)
    assert not chk["ok"] and chk["violation"] > 0 and chk["worst_flip_class"] == "b"


@pytest.mark.slow
def test_compress_rsmas_int8_for_jetson_completes_with_tensorrt_correct_int8(tmp_path):
    """The flagship recipe for a Jetson target on the phantom (tiny settings): PTQ alone, TensorRT's Q/DQ rules."""
    from edgeus.pipeline import compress
    from edgeus.quantize.placement import NORM_INTERNALS

    cfg = make_cfg("recipe=rsmas_int8", f"target={TRT}", "model.name=rsmas", "model.width=0.125",
                   "data.n_per_class=12", "data.image_size=64", "data.batch_size=16", "train.epochs=1",
                   "prune.finetune_epochs=1", "decompose.finetune_epochs=1", "compress.latency_iters=3",
                   "quantize.fallback=none", "quantize.qat=false", "quantize.num_images=16", "gates.enforce=false",
                   f"out={tmp_path / 'run'}", "seed=0")
    compress(cfg)
    int8 = next((tmp_path / "run").glob("*-quantize/student.int8.onnx"))
    m = onnx.load(str(int8))
    assert check_tensorrt_qdq(m, require_qdq=True, placement=True) == []
    ops = {n.op_type for n in m.graph.node}
    assert {"ReduceMean", "Sqrt"} & ops or "LayerNormalization" in ops          # the model has normalisation
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    fed = {c for n in m.graph.node if n.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], [])}
    assert not fed & NORM_INTERNALS and fed <= {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(tmp_path):
    """A depth-wise convolution over positive inputs: rounding its 9 weights per channel shifts each output
    channel's mean; the corrected bias cancels that shift (measured on the calibration images)."""
    from edgeus.quantize.recovery import bias_correct

    torch.manual_seed(0)
    dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    with torch.no_grad():
        dw.weight.copy_(torch.randn(8, 1, 3, 3) * 0.3 + 0.05)
    torch.onnx.export(dw.eval(), (torch.rand(1, 8, 12, 12),), str(tmp_path / "dw.onnx"), input_names=["input"],
                      output_names=["out"], opset_version=17, dynamic_axes={"input": {0: "b"}, "out": {0: "b"}},
                      dynamo=False)
    x = (np.random.default_rng(0).random((32, 8, 12, 12)) * 2 + 0.5).astype(np.float32)
    calib = C.CalibrationSet(x, np.zeros(32, np.int64), [str(i) for i in range(32)],
                             C.CalibrationSpec(num_images=0, batch_size=8), "synthetic")
    C.compute_ranges(tmp_path / "dw.onnx", calib, tmp_path / "r.json")
    lay = QDQLayout.from_target(compose([f"target={TRT}"]).target)
    lay.per_channel = False                           # coarse per-tensor weights: a visible rounding shift
    lay.layout = "onnxruntime"                        # (not a TensorRT-valid layout; the arithmetic is the point)
    lay.residual_qdq = False
    q = Quantiser(tmp_path / "dw.onnx", lay, tmp_path / "r.json", "minmax")
    q(tmp_path / "q.onnx")
    corrected, info = bias_correct(tmp_path / "dw.onnx", tmp_path / "q.onnx", calib, tmp_path / "bc.onnx")
    Quantiser(corrected, lay, tmp_path / "r.json", "minmax")(tmp_path / "qbc.onnx")
    ref = run_logits(tmp_path / "dw.onnx", x)
    before = np.abs((run_logits(tmp_path / "q.onnx", x, optimization="disable") - ref).mean((0, 2, 3))).max()
    after = np.abs((run_logits(tmp_path / "qbc.onnx", x, optimization="disable") - ref).mean((0, 2, 3))).max()
    assert info["layers"] == 1 and after < 0.5 * before, (before, after)


def test_entropy_calibration_searches_thresholds(tmp_path):
    """ONNX Runtime's default entropy histogram (128 bins = its 128 quantised bins) leaves one candidate, the
    min-max range; with TensorRT's 2048 bins the KL search clips a heavy-tailed tensor."""
    lin = torch.nn.Linear(16, 3)
    torch.onnx.export(lin.eval(), (torch.zeros(1, 16),), str(tmp_path / "lin.onnx"), input_names=["input"],
                      output_names=["logits"], opset_version=17, dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}},
                      dynamo=False)
    x = np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)
    x[0, 0] = 40.0                                                     # one outlier
    spec = C.CalibrationSpec(num_images=0, batch_size=8, method="minmax")
    cs = C.CalibrationSet(x, np.zeros(20, np.int64), [str(i) for i in range(20)], spec, "synthetic")
    mm = C.compute_ranges(tmp_path / "lin.onnx", cs, tmp_path / "mm.json")
    spec.method = "entropy"                                            # 20 images, batch 8: uniform batches of 5
    ent = C.compute_ranges(tmp_path / "lin.onnx", cs, tmp_path / "ent.json", symmetric=True)
    assert max(abs(v) for v in ent["input"]) < 0.5 * max(abs(v) for v in mm["input"]), (ent["input"], mm["input"])


class _NormGate(torch.nn.Module):
    """Conv -> channel LayerNorm (ReduceMean/Sub/Mul/Sqrt/Div, affine) -> sigmoid gate -> conv + residual add."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.g = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.b = torch.nn.Parameter(torch.randn(1, 8, 1, 1) * 0.1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        mu = y.mean(1, keepdim=True)
        d = y - mu
        n = d / torch.sqrt((d * d).mean(1, keepdim=True) + 1e-5) * self.g + self.b
        z = torch.relu(self.c2(n * torch.sigmoid(n)) + y)
        return self.fc(z.mean((2, 3)))


def _normgate_onnx(tmp_path):
    """The seeded _NormGate model as FP32 ONNX, and 32 calibration images for it."""
    torch.manual_seed(0)
    fp32 = tmp_path / "ng.onnx"
    torch.onnx.export(_NormGate().eval(), (torch.randn(1, 1, 16, 16),), str(fp32), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "b"}, "logits": {0: "b"}}, opset_version=17,
                      dynamo=False)
    return fp32, np.random.default_rng(0).normal(size=(32, 1, 16, 16)).astype(np.float32)


def test_cpu_layout_quantises_integer_kernel_ops_only_and_keeps_norm_and_gates_float(tmp_path):
    fp32, x = _normgate_onnx(tmp_path)
    spec = C.CalibrationSpec(num_images=0, batch_size=8)
    calib = C.CalibrationSet(x, np.zeros(len(x), np.int64), [str(i) for i in range(len(x))], spec, "0" * 64)
    ranges = tmp_path / "ranges.json"
    C.compute_ranges(fp32, calib, ranges)
    lay = QDQLayout.from_target(compose(["target=cpu"]).target)
    assert lay.quantized_op_types == qdq.CPU_OP_TYPES and "Mul" not in lay.quantized_op_types
    out = qdq.quantize_model(fp32, tmp_path / "ng.int8.onnx", lay, ranges, "minmax")
    m = onnx.load(str(out))
    # every activation Q/DQ pair is there for an integer-kernel op: what reads a DQ'd activation is one of them
    # (or a float op sharing its producer's pair: LayerNorm's ReduceMean/Sub read the Relu output the residual Add
    # quantises), and no normalisation internal or gate output is quantised for a float consumer
    inits = {t.name for t in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    cons: dict = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] in inits or prod[n.input[0]].input[0] in inits:
            continue
        readers = cons.get(n.output[0], [])
        src = prod.get(prod[n.input[0]].input[0])               # the op whose output this pair quantises
        assert (any(c.op_type in qdq.CPU_OP_TYPES for c in readers)
                or src is None or src.op_type in qdq.CPU_OP_TYPES), ([c.op_type for c in readers], src.op_type)
    both = [n for n in m.graph.node if n.op_type == "Add"
            and all(i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(both) == 1                                        # the residual add, not eps / beta
    q_of = {prod[n.input[0]].op_type for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in prod}
    assert not {"Sigmoid", "Sqrt", "Div", "Sub"} & q_of
    fl = qdq.float_elementwise(onnx.load(str(fp32)))
    assert sum(n.op_type == "Add" for n in onnx.load(str(fp32)).graph.node if n.name in fl) >= 2
    ref, got = run_logits(str(fp32), x), run_logits(str(out), x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max()


def test_bundle_manifest_names_host_and_target_isa(trained, ptq, tmp_path, small_bundle):
    import json

    from edgeus.deploy import package

    _, _, d = trained
    cfg = compose(["target=cpu", "package.golden=2", "package.tar=false"])
    out = package(None, tmp_path / "bundle", cfg.package, target=cfg.target, fp32_onnx=d / "fp32.onnx",
                  int8_onnx=d / "cpu.int8.onnx", data=small_bundle)
    isa_rec = json.loads((out / "manifest.json").read_text())["model"]["int8_isa"]
    assert isa_rec["target_isa"] == "x86_avx2" and isa_rec["host_isa"]
    assert "accuracy_mode" in isa_rec


def test_mse_range_clips_a_rare_outlier_and_keeps_a_dense_range():
    edges = np.linspace(-10, 10, 2049)
    c = (edges[:-1] + edges[1:]) / 2
    dense = np.where(np.abs(c) < 1, 100_000, 0)
    lo, hi = C.mse_range(dense, edges, -1.0, 1.0)
    assert (lo, hi) == pytest.approx((-1.0, 1.0), abs=0.02)               # nothing to clip
    outlier = dense + np.where(np.abs(c - 9.99) < 0.01, 1, 0)           # one value at 10x the rest
    lo, hi = C.mse_range(outlier, edges, -1.0, 10.0)
    assert hi < 5.0 and lo == pytest.approx(-1.0, abs=0.05)
    a, b = C.mse_range(outlier, edges, -1.0, 10.0, symmetric=True)
    assert a == -b and b < 5.0


def test_mse_calibration_writes_a_cache_quantize_static_reads(tmp_path):
    fp32, x = _normgate_onnx(tmp_path)
    spec = C.load_spec("mse")
    assert spec.method == "mse"
    calib = C.CalibrationSet(x, np.zeros(len(x), np.int64), [str(i) for i in range(len(x))], spec, "0" * 64)
    ranges = C.compute_ranges(fp32, calib, tmp_path / "mse.json")
    lay = QDQLayout.from_target(compose(["target=cpu"]).target)
    out = qdq.quantize_model(fp32, tmp_path / "ng.int8.onnx", lay, tmp_path / "mse.json", "mse")
    ref, got = run_logits(str(fp32), x), run_logits(str(out), x)
    assert np.abs(ref - got).max() < 0.1 * np.abs(ref).max() and ranges
