"""Issue 20.2 (rest): the two-stage models' segmentation through export, quantisation, the ledger, the
gates and the bundle; compression keeps the U-Net -> classifier input consistent."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_cfg

TWO = ("model.name=two_stage", "model.width=0.125", "model.kwargs={classifier: simple_cnn}")


def _export(model, path, cfg=None):
    from edgeus.onnx.export import export_onnx

    cfg = cfg or make_cfg()
    return export_onnx(model, path, cfg.export, preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5],
                                                                "std": [0.25]})


def test_export_gives_a_two_stage_model_a_mask_output_and_checks_its_parity(tmp_path):
    from edgeus.models import create_model
    from edgeus.onnx.session import session

    torch.manual_seed(0)
    m = create_model("two_stage", num_classes=3, width=0.125, classifier="simple_cnn")
    rep = _export(m, tmp_path / "m.onnx")
    assert rep["outputs"] == ["logits", "mask"] and rep["parity"]["passed"]
    assert rep["parity"]["mask_max_abs_diff"] < 1e-4 and rep["parity"]["mask_agreement"] == 1.0
    sess = session(tmp_path / "m.onnx")
    assert [o.name for o in sess.get_outputs()] == ["logits", "mask"]
    x = torch.randn(3, 1, 32, 32)
    logits, mask = sess.run(None, {"input": x.numpy()})
    assert logits.shape == (3, 3) and mask.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(mask, m.eval().segment(x).detach().numpy(), atol=1e-4)
    plain = create_model("simple_cnn", num_classes=3, width=0.25)      # every other model: one output, as before
    rep = _export(plain, tmp_path / "p.onnx")
    assert rep["outputs"] == ["logits"] and "mask_max_abs_diff" not in rep["parity"]
    assert [o.name for o in session(tmp_path / "p.onnx").get_outputs()] == ["logits"]


def test_segmentation_metrics_of_torch_and_onnx_agree_and_leave_the_rng_alone(tmp_path):
    from edgeus.data import build_datasets, build_loaders
    from edgeus.models import create_model
    from edgeus.segmentation import segmentation_metrics

    cfg = make_cfg()
    bundle = build_datasets(cfg.data)
    loader = build_loaders(bundle, cfg.data)["test"]
    torch.manual_seed(0)
    m = create_model("two_stage", num_classes=3, width=0.125, classifier="simple_cnn").eval()
    _export(m, tmp_path / "m.onnx")
    state = torch.get_rng_state()
    a = segmentation_metrics(m, loader)
    b = segmentation_metrics(str(tmp_path / "m.onnx"), loader)
    assert torch.equal(state, torch.get_rng_state())
    assert a["n"] == b["n"] == len(bundle.test) and abs(a["dice_mean"] - b["dice_mean"]) < 0.02
    assert len(a["per_image"]) == a["n"]
    assert segmentation_metrics(create_model("simple_cnn", num_classes=3, width=0.25), loader) is None


def test_dice_gate_only_when_both_segment_and_its_sign():
    from edgeus.pipeline import gates as G

    g = make_cfg("gates.max_dice_drop=0.05", "gates.critical_class=malignant").gates
    base = {"accuracy": 0.9, "ece": 0.05, "n": 10, "recall": {"normal": 1.0, "benign": 1.0, "malignant": 1.0},
            "per_class": {c: {"support": 3} for c in ("normal", "benign", "malignant")}}
    t = {**base, "dice": 0.80, "segmentation": {"n": 10}}
    res = G.check("quantize", t, {**base, "dice": 0.70, "segmentation": {"n": 10}}, g, ["normal", "benign", "malignant"])
    dice = [r for r in res if r["metric"] == "Dice (mask)"]
    assert len(dice) == 1 and dice[0]["status"] == "fail" and abs(dice[0]["change"] + 0.10) < 1e-9
    assert dice[0]["limit"] == 0.05 and dice[0]["n"] == 10
    res = G.check("quantize", t, {**base, "dice": 0.78, "segmentation": {"n": 10}}, g, ["normal", "benign", "malignant"])
    assert [r["status"] for r in res if r["metric"] == "Dice (mask)"] == ["pass"]
    res = G.check("quantize", t, base, g, ["normal", "benign", "malignant"])        # the student does not segment
    assert not [r for r in res if r["metric"].startswith("Dice")]


def test_pruning_two_stage_keeps_the_unet_and_classifier_input_consistent():
    from edgeus.prune import example_input, prune_model

    torch.manual_seed(0)
    cfg = make_cfg(*TWO, "prune.method=structured", "prune.target_macs=0.6", "prune.finetune_epochs=0")
    from edgeus.models import create_model

    m = create_model("two_stage", num_classes=3, width=0.125, classifier="simple_cnn")
    pruned, rep = prune_model(m, cfg.prune, finetune=None, loaders=None, device="cpu",
                              example_inputs=example_input(m, 32, 1))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = pruned.eval()(x)
        mask = pruned.segment(x)
    assert logits.shape == (2, 3) and mask.shape == (2, 1, 32, 32)
    first = next(mod for mod in pruned.classifier.modules() if isinstance(mod, torch.nn.Conv2d))
    assert first.in_channels == 3                     # [image, mask, mask]: never cut
    assert pruned.segmenter.head.out_channels == 1    # one mask
    assert rep["after"]["macs"] < rep["before"]["macs"]
    # the U-Net is traced through its cached mask logits and pruned with the classifier; the exported
    # pruned model still returns the same mask it classifies from
    assert pruned.segmenter.enc[1][0].out_channels < m.segmenter.enc[1][0].out_channels
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        exp = _export(pruned, f"{d}/p.onnx", cfg)
    assert exp["outputs"] == ["logits", "mask"] and exp["parity"]["passed"]


@pytest.mark.slow
def test_two_stage_int8_recipe_on_the_phantom_has_a_dice_and_the_bundle_returns_the_mask(tmp_path):
    from edgeus.onnx.session import session
    from edgeus.pipeline import compress

    out = tmp_path / "run"
    cfg = make_cfg("recipe=two_stage_int8", *TWO, "data.n_per_class=15", "decompose.finetune_epochs=0",
                   "recipe.stages=[teacher,decompose,export,quantize,package]", "compress.robustness=false",
                   "compress.baseline_int8=false", "compress.latency_iters=2", "compress.latency_warmup=0",
                   "quantize.qat=false", "quantize.fallback=none", "gates.enforce=false", "package.golden=2",
                   f"out={out}")
    assert cfg.gates.critical_class == "malignant"      # auto on the phantom
    compress(cfg)
    ledger = json.loads((out / "ledger.json").read_text())
    rows = {r["stage"]: r for r in ledger["rows"]}
    for stage in ("teacher", "decompose", "quantize"):
        m = rows[stage]["metrics"]
        assert 0.0 <= m["dice"] <= 1.0 and 0.0 <= m["iou"] <= 1.0 and m["segmentation"]["n"] > 0, stage
    per = json.loads((out / "01-decompose" / "segmentation.json").read_text())
    assert len(per["per_image"]) == per["n"]
    gates = [g for g in ledger["gates"] if g["metric"] == "Dice (mask)"]
    assert {g["stage"] for g in gates} == {"decompose", "quantize"}
    assert all(abs(g["change"] - (g["student"] - g["teacher"])) < 1e-9 and g["limit"] == 0.10 for g in gates)
    bundle = out / "04-package" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [o["name"] for o in manifest["model"]["outputs"]] == ["logits", "mask"]
    int8 = [p for p in (bundle / "model").glob("*.onnx") if "int8" in p.name]
    assert int8
    sess = session(int8[0])
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    logits, mask = sess.run(None, {sess.get_inputs()[0].name: x})
    assert logits.shape == (2, 3) and mask.shape == (2, 1, 32, 32) and 0.0 <= mask.min() and mask.max() <= 1.0
    seg = manifest["model"]["segmentation"]
    assert seg["output"] == "mask" and seg["threshold"] == 0.5
    assert manifest["model"]["outputs"][1]["role"] == "segmentation mask"
    report = (out / "report.md").read_text()
    assert "## Segmentation (two-stage mask)" in report and "| mask Dice (IoU) |" in report
    assert "Dice (mask)" in report                                   # the gate's row
    # edgeus eval scores the masks too: the run's teacher and INT8 student, and the INT8 file alone (per image)
    from edgeus.cli import main

    assert main(["eval", f"run={out}"]) == 0
    ev = json.loads((out / "eval.test.json").read_text())["models"]
    assert ev["teacher"]["dice"] is not None and ev["student"]["dice"] is not None
    assert main(["eval", str(out / "student.int8.onnx"), f"eval.out={tmp_path / 'e.json'}"]) == 0
    seg = json.loads((tmp_path / "e.json").read_text())["segmentation"]
    assert seg["n"] == len(seg["per_image"]) > 0 and abs(seg["dice_mean"] - rows["quantize"]["metrics"]["dice"]) < 1e-9
    # the bundle carries the expected masks of its golden inputs and verify checks them
    from edgeus.deploy import verify

    entry = next(e for e in manifest["golden"]["outputs"] if e["precision"] == "int8")
    assert entry["mask"]["expected"] == "golden/expected_mask.int8.npy"
    rep = verify(bundle)
    assert rep["ok"] and any("mask output matches" in c for c in rep["checks"])


@pytest.mark.slow
def test_prune_stage_on_two_stage_keeps_the_mask_and_gates_its_dice(tmp_path):
    from edgeus.pipeline import compress

    out = tmp_path / "run"
    cfg = make_cfg("recipe=two_stage_int8", *TWO, "data.n_per_class=15", "recipe.stages=[teacher,prune,export]",
                   "prune.method=structured", "prune.target_macs=0.6", "prune.finetune_epochs=1",
                   "prune.measure_latency=false", "compress.robustness=false", "compress.report=false",
                   "compress.latency_iters=2", "compress.latency_warmup=0", "gates.enforce=false", f"out={out}")
    compress(cfg)
    ledger = json.loads((out / "ledger.json").read_text())
    rows = {r["stage"]: r for r in ledger["rows"]}
    assert rows["prune"]["macs"] < rows["teacher"]["macs"] and rows["prune"]["metrics"]["dice"] is not None
    assert [g["metric"] for g in ledger["gates"] if g["stage"] == "prune"][-1] == "Dice (mask)"
    exp = json.loads((out / "01-prune" / "export.json").read_text())
    assert exp["outputs"] == ["logits", "mask"] and exp["parity"]["passed"]
