"""ONNX export: opset, names, dynamic batch, simplification, checker, parity, metadata, CLI; the one
ONNX Runtime session helper (edgeus.onnx.session) and the metadata helpers (edgeus.onnx.metadata)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import make_cfg

from edgeus.errors import EdgeusError
from edgeus.models import create_model
from edgeus.onnx.export import ExportParityError, export_onnx, export_plain, export_with_data, target_opset
from edgeus.onnx.metadata import model_info, read_metadata
from edgeus.onnx.session import run_logits, session

PRE = {"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]}


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = make_cfg("data.n_per_class=6")
    return create_model("simple_cnn", width=0.25).eval(), cfg


def test_export_graph_is_clean_and_matches_torch(small, tmp_path):
    model, cfg = small
    out = tmp_path / "m.onnx"
    rep = export_onnx(model, out, cfg.export, preprocessing=PRE, classes=["normal", "benign", "malignant"])
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "Identity" not in rep["ops"]                       # dropout's Identity removed by onnxslim
    assert rep["parity"]["passed"] and rep["parity"]["max_abs_diff"] <= 1e-3
    assert rep["parity"]["top1_agreement"] == 1.0
    assert rep["parity"]["source"].startswith("seeded normal noise")
    for bs in (1, 5):                                         # dynamic batch really works
        x = torch.randn(bs, 1, 32, 32)
        with torch.no_grad():
            np.testing.assert_allclose(run_logits(out, x.numpy()), model(x).numpy(), atol=1e-4)
    meta = read_metadata(out)
    assert meta["edgeus.classes"] == ["normal", "benign", "malignant"]
    assert meta["edgeus.preprocessing"] == PRE
    assert meta["edgeus.arch"]["name"] == "simple_cnn"
    assert "edgeus.data" not in meta                          # no fingerprint given, none invented
    info = model_info(out)
    assert info["classes"] == ["normal", "benign", "malignant"] and info["preprocessing"]["image_size"] == 32


def test_parity_uses_real_images_when_data_is_given(small, tmp_path):
    from edgeus.data import build_datasets

    model, cfg = small
    bundle = build_datasets(cfg.data)
    rep = export_with_data(model, tmp_path / "m.onnx", cfg.export, bundle, data={"dataset": "phantom"})
    assert rep["parity"]["source"].startswith("val split")
    assert rep["parity"]["n"] == min(len(bundle.val), cfg.export.parity_samples)
    meta = read_metadata(tmp_path / "m.onnx")
    assert meta["edgeus.classes"] == bundle.classes and meta["edgeus.data"] == {"dataset": "phantom"}


def test_parity_loss_fails_loudly(small, tmp_path):
    model, _ = small
    cfg = make_cfg("export.atol=-1.0")   # no export can meet a negative tolerance
    with pytest.raises(ExportParityError, match="parity lost"):
        export_onnx(model, tmp_path / "m.onnx", cfg.export, preprocessing=PRE)


def test_nan_weights_are_refused_not_exported(small, tmp_path):
    import copy

    from edgeus.errors import InputError

    model, cfg = small
    bad = copy.deepcopy(model)
    next(p for p in bad.parameters() if p.dim() > 1).data[0].fill_(float("nan"))
    with pytest.raises(InputError, match="NaN or Inf"):
        export_onnx(bad, tmp_path / "m.onnx", cfg.export, preprocessing=PRE)
    assert not (tmp_path / "m.onnx").exists()


def test_opset_below_13_is_refused(small, tmp_path):
    model, _ = small
    cfg = make_cfg("export.opset=12")
    with pytest.raises(EdgeusError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", cfg.export, preprocessing=PRE, target_opset=None)


def test_target_opset_raises_export_opset(small, tmp_path):
    model, _ = small
    cfg = make_cfg("export.opset=17")
    cfg.target.quant = {"opset": 18}
    rep = export_onnx(model, tmp_path / "m.onnx", cfg.export, preprocessing=PRE, target_opset=target_opset(cfg.target))
    assert rep["opset"] == 18


def test_a_bad_target_opset_is_an_error_not_ignored():
    cfg = make_cfg()
    cfg.target.quant = {"opset": "seventeen"}
    with pytest.raises(EdgeusError, match="quant.opset='seventeen'"):
        target_opset(cfg.target)
    cfg.target.quant = {}
    assert target_opset(cfg.target) is None


def test_export_needs_the_models_preprocessing(small, tmp_path):
    model, cfg = small
    with pytest.raises(EdgeusError, match="preprocessing"):
        export_onnx(model, tmp_path / "m.onnx", cfg.export, preprocessing={})


def test_session_and_run_logits(small, tmp_path):
    model, _ = small
    x = torch.randn(3, 1, 32, 32)
    path = export_plain(model, x[:1], tmp_path / "p.onnx", input_name="input")
    one = run_logits(path, x[:1].numpy().astype(np.float64))            # cast to float32
    sess = session(path, threads=1)
    assert session(sess) is sess                                         # a session passes through
    assert run_logits(sess, x[:1].numpy(), batch=None).shape == one.shape == (1, 3)
    with pytest.raises(EdgeusError, match="not found"):
        session(tmp_path / "missing.onnx")
    with pytest.raises(EdgeusError, match="cannot load"):
        session(b"not an onnx model")
    with pytest.raises(EdgeusError, match="optimization"):
        session(path, optimization="max")


def test_only_edgeus_onnx_session_constructs_inference_sessions():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "edgeus"
    hits = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "InferenceSession(" in p.read_text())
    assert hits == ["onnx/session.py"]


def test_export_command_from_checkpoint(small, tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.train.checkpoint import save_checkpoint

    model, _ = small
    ckpt = save_checkpoint(tmp_path / "s.pt", model, classes=["normal", "benign", "malignant"], preprocessing=PRE)
    rc = main(["export", str(ckpt), "data.n_per_class=6"])
    assert rc == 0
    assert (tmp_path / "s.onnx").is_file() and (tmp_path / "s.export.json").is_file()
    assert "parity vs torch on val split" in capsys.readouterr().out
    assert model_info(tmp_path / "s.onnx")["classes"] == ["normal", "benign", "malignant"]


def test_calibration_joins_the_data_fingerprint(small, tmp_path):
    from edgeus.onnx.metadata import add_calibration

    model, _ = small
    out = tmp_path / "m.onnx"
    export_onnx(model, out, make_cfg().export, preprocessing=PRE, data={"dataset": "phantom", "n": {"train": 3},
                                                                       "sha256": {"train": "t"}, "root": None})
    assert add_calibration(out, ["phantom:0:benign:1", "phantom:0:normal:2"])
    fp = model_info(out)["data"]
    assert fp["n"]["calibration"] == 2 and len(fp["sha256"]["calibration"]) == 64 and fp["sha256"]["train"] == "t"
    bare = tmp_path / "bare.onnx"
    export_onnx(model, bare, make_cfg().export, preprocessing=PRE)
    assert not add_calibration(bare, ["x"]) and model_info(bare)["data"] is None
