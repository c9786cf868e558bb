"""ONNX export: opset, names, dynamic batch, simplification, checker, parity, metadata, CLI."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgeus.config import compose
from edgeus.models import create_model
from edgeus.quantize import export_onnx
from edgeus.quantize.export import ExportParityError, read_metadata


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    cfg = compose(["data.n_per_class=6", "data.image_size=32"])
    return create_model("simple_cnn", width=0.25).eval(), cfg


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def test_export_graph_is_clean_and_matches_torch(small, tmp_path):
    model, cfg = small
    out = tmp_path / "m.onnx"
    rep = export_onnx(model, out, cfg, classes=["normal", "benign", "malignant"])
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in m.graph.input] == ["input"] and [o.name for o in m.graph.output] == ["logits"]
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "Identity" not in rep["ops"]                       # dropout's Identity removed by onnxslim
    assert rep["parity"]["passed"] and rep["parity"]["max_abs_diff"] <= 1e-3
    assert rep["parity"]["top1_agreement"] == 1.0
    for bs in (1, 5):                                         # dynamic batch really works
        x = torch.randn(bs, 1, 32, 32)
        with torch.no_grad():
            np.testing.assert_allclose(_run(out, x), model(x).numpy(), atol=1e-4)
    meta = read_metadata(out)
    assert meta["edgeus.classes"] == ["normal", "benign", "malignant"]
    assert meta["edgeus.preprocessing"]["image_size"] == 32
    assert meta["edgeus.arch"]["name"] == "simple_cnn"


def test_parity_uses_real_images_when_data_is_given(small, tmp_path):
    from edgeus.data import build_datasets

    model, cfg = small
    bundle = build_datasets(cfg.data)
    rep = export_onnx(model, tmp_path / "m.onnx", cfg, bundle=bundle)
    assert rep["parity"]["source"].startswith("val split")
    assert rep["parity"]["n"] == min(len(bundle.val), cfg.export.parity_samples)


def test_parity_loss_fails_loudly(small, tmp_path):
    model, _ = small
    cfg = compose(["data.image_size=32", "export.atol=-1.0"])   # no export can meet a negative tolerance
    with pytest.raises(ExportParityError, match="parity lost"):
        export_onnx(model, tmp_path / "m.onnx", cfg)


def test_opset_below_13_is_refused(small, tmp_path):
    from edgeus.errors import EdgeusError

    model, _ = small
    cfg = compose(["data.image_size=32", "export.opset=12"])
    cfg.target.quant = {}                     # no target opset to raise it
    with pytest.raises(EdgeusError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", cfg)


def test_target_opset_raises_export_opset(small, tmp_path):
    model, _ = small
    cfg = compose(["data.image_size=32", "export.opset=17"])
    cfg.target.quant = {"opset": 18}
    rep = export_onnx(model, tmp_path / "m.onnx", cfg)
    assert rep["opset"] == 18


def test_export_command_from_checkpoint(small, tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.train.checkpoint import save_checkpoint

    model, _ = small
    ckpt = save_checkpoint(tmp_path / "s.pt", model, classes=["normal", "benign", "malignant"],
                           preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    rc = main(["export", str(ckpt), "data.n_per_class=6"])
    assert rc == 0
    assert (tmp_path / "s.onnx").is_file() and (tmp_path / "s.export.json").is_file()
    assert "parity vs torch on val split" in capsys.readouterr().out
