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


def test_residual_add_inputs_are_quantised_for_tensorrt(tmp_path):
    """A residual block: TensorRT wants Q/DQ on both Add inputs and symmetric per-channel weights."""
    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.fc(torch.relu(self.b(y) + y).mean((2, 3)))

    from edgeus.data import build_datasets

    cfg = make_cfg("data.n_per_class=6", "data.image_size=16", f"target={TRT}", "quantize.num_images=9", tiny=False)
    bundle = build_datasets(cfg.data)
    export_onnx(Res().eval(), tmp_path / "r.onnx", cfg, bundle)
    quantize(tmp_path / "r.onnx", tmp_path / "r.int8.onnx", cfg, bundle)
    m = onnx.load(str(tmp_path / "r.int8.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    add = next(n for n in m.graph.node if n.op_type == "Add")
    assert all(producer[i].op_type == "DequantizeLinear" for i in add.input)
    assert check_tensorrt_qdq(m, require_qdq=True) == []


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
