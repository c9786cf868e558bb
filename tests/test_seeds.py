"""The seed papers' systems (issue 20): DenseNet-201 (seed 001), Coordinate Attention and Ghost
modules and CP decomposition (seed 002's review), seed metrics (PR-AP, curves), CAMUS views (seed 003)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import make_cfg
from edgeus.models import create_model, list_models

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _export_parity(model: nn.Module, x: torch.Tensor, path: Path | None = None) -> float:
    """Max |ONNX Runtime - torch| over the logits (TorchScript exporter, dynamic batch)."""
    import io
    import warnings

    from edgeus.onnx.session import run_logits

    model.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:1],), f, opset_version=17, dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    if path is not None:
        Path(path).write_bytes(f.getvalue())
    got = run_logits(f.getvalue(), x.numpy(), batch=None, threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max())))


def _prune(model, ratio=0.4, *extra):
    from edgeus.prune import example_input, prune_model

    cfg = make_cfg(f"data.image_size={SIZE}", "prune.measure_latency=false", f"prune.ratio={ratio}", *extra)
    return prune_model(model, cfg.prune, example_inputs=example_input(model, SIZE))


def _roundtrip(model, tmp_path):
    """Save as an edgeus checkpoint and rebuild from it (the pruning record replays the shapes)."""
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    path = save_checkpoint(tmp_path / "m.pt", model, classes=["a", "b", "c"],
                           preprocessing={"image_size": SIZE, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    loaded, _ = load_checkpoint(path)
    return loaded.eval()


# --- 1. DenseNet-201 ---------------------------------------------------------------------------------

def test_densenet201_is_listed_and_has_torchvisions_layout():
    assert "densenet201" in list_models()
    m = create_model("densenet201", num_classes=1000, in_chans=3)
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == 20_013_928      # torchvision densenet201
    assert len(sd) == 1207
    for key, shape in {
        "features.conv0.weight": (64, 3, 7, 7),
        "features.denseblock1.denselayer1.norm1.weight": (64,),
        "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
        "features.denseblock1.denselayer6.conv2.weight": (32, 128, 3, 3),
        "features.transition1.conv.weight": (128, 256, 1, 1),
        "features.denseblock3.denselayer48.norm1.running_var": (256 + 47 * 32,),
        "features.transition3.conv.weight": (896, 1792, 1, 1),
        "features.denseblock4.denselayer32.conv2.weight": (32, 128, 3, 3),
        "features.norm5.weight": (1920,),
        "classifier.weight": (1000, 1920),
    }.items():
        assert tuple(sd[key].shape) == shape, key


def test_densenet201_pretrained_torchvision_file_loads(tmp_path):
    """A torchvision-named file (here at width 0.125, with old-style ``norm.1`` keys as torchvision's own
    download has) loads: stem summed to one channel, head re-initialised for another class count."""
    from edgeus.models.pretrained import load_pretrained

    torch.manual_seed(0)
    src = create_model("densenet201", num_classes=1000, in_chans=3, width=0.125)
    old = {}
    for k, v in src.state_dict().items():
        for part in ("norm1", "norm2", "conv1", "conv2"):
            if f".{part}." in k and "denselayer" in k:
                k = k.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
                break
        old[k] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "densenet201.pth"
    torch.save(old, path)
    dst = create_model("densenet201", num_classes=2, in_chans=1, width=0.125)
    head = dst.classifier.weight.detach().clone()
    report = load_pretrained(dst, path)
    torch.testing.assert_close(dst.features.conv0.weight, src.features.conv0.weight.sum(1, keepdim=True))
    torch.testing.assert_close(dst.features.denseblock3.denselayer20.conv2.weight,
                               src.features.denseblock3.denselayer20.conv2.weight)
    torch.testing.assert_close(dst.features.norm5.running_mean, src.features.norm5.running_mean)
    assert torch.equal(dst.classifier.weight, head)
    assert set(report["head_reinitialised"]) == {"classifier.weight", "classifier.bias"}
    assert "features.conv0.weight" in report["adapted"] and not report["unused"]
    src.eval(), dst.eval()
    x = torch.randn(1, 1, SIZE, SIZE)
    torch.testing.assert_close(dst.features(x), src.features(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_densenet201_width_in_chans_and_onnx_parity():
    torch.manual_seed(0)
    for in_chans in (1, 3):
        m = create_model("densenet201", num_classes=3, in_chans=in_chans, width=0.125)
        assert m.features.conv0.in_channels == in_chans
        assert m.features.denseblock1.denselayer1.conv2.out_channels == 4   # growth 32 * 0.125
    m = create_model("densenet201", num_classes=3, in_chans=1, width=0.125).eval()
    assert _export_parity(m, torch.randn(3, 1, SIZE, SIZE)) < 1e-4


def _dense_channels_consistent(model) -> None:
    """Every dense layer's input = the block input + the new channels of the layers before it."""
    feats = model.features
    n = feats.conv0.out_channels
    assert feats.norm0.num_features == n
    for b in range(1, 5):
        block = getattr(feats, f"denseblock{b}")
        for layer in block.values():
            assert layer.norm1.num_features == layer.conv1.in_channels == n
            assert layer.norm2.num_features == layer.conv1.out_channels == layer.conv2.in_channels
            n += layer.conv2.out_channels
        if b < 4:
            t = getattr(feats, f"transition{b}")
            assert t.norm.num_features == t.conv.in_channels == n
            n = t.conv.out_channels
    head = model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[0]
    assert feats.norm5.num_features == head.in_features == n


@pytest.mark.slow
def test_densenet201_prunes_through_dense_concatenations(tmp_path):
    torch.manual_seed(0)
    model = create_model("densenet201", num_classes=3, in_chans=1, width=0.125)
    before = copy.deepcopy(model)
    pruned, rep = _prune(model, 0.4)
    _dense_channels_consistent(pruned)
    s = rep["structured"]
    assert rep["after"]["macs"] < 0.8 * rep["before"]["macs"]
    # the concatenations were followed: growth channels, bottlenecks and transitions all shrank
    assert pruned.features.denseblock2.denselayer3.conv2.out_channels < 4
    assert pruned.features.denseblock4.denselayer1.conv1.out_channels < 16
    assert pruned.features.transition2.conv.out_channels < before.features.transition2.conv.out_channels
    assert pruned.features.norm5.num_features < before.features.norm5.num_features
    assert pruned.classifier.out_features == 3
    assert any(w["layer"] == "classifier" for w in s["layers_left_whole"])
    json.dumps(rep)
    x = torch.randn(2, 1, SIZE, SIZE)
    assert pruned.eval()(x).shape == (2, 3)
    assert _export_parity(pruned, x) < 1e-4
    again = _roundtrip(pruned, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))
    # the input model is untouched
    for (k, a), b in zip(model.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), k


# --- 2. Coordinate Attention and Ghost modules ----------------------------------------------------------

def test_coordinate_attention_is_two_axis_gates():
    from edgeus.models.layers import CoordinateAttention

    torch.manual_seed(0)
    ca = CoordinateAttention(16, reduction=4).eval()
    x = torch.randn(2, 16, 6, 9)
    a_h, a_w = ca.gates(x)
    assert a_h.shape == (2, 16, 6, 1) and a_w.shape == (2, 16, 1, 9)
    torch.testing.assert_close(ca(x), x * a_h * a_w)
    # the reference: pool per axis (nn.AdaptiveAvgPool2d((None, 1)) and ((1, None))), shared 1x1 conv on both strips
    x_h = nn.AdaptiveAvgPool2d((None, 1))(x)
    x_w = nn.AdaptiveAvgPool2d((1, None))(x).permute(0, 1, 3, 2)
    y = ca.act(ca.bn1(ca.conv1(torch.cat([x_h, x_w], dim=2))))
    ref_h = torch.sigmoid(ca.conv_h(y[:, :, :6]))
    ref_w = torch.sigmoid(ca.conv_w(y[:, :, 6:].permute(0, 1, 3, 2)))
    torch.testing.assert_close(a_h, ref_h)
    torch.testing.assert_close(a_w, ref_w)
    # the height gate depends on rows only: shuffling columns permutes nothing in it
    perm = torch.randperm(9)
    torch.testing.assert_close(ca.gates(x[..., perm])[0], a_h)


def test_ghost_module_is_a_conv_and_its_cheap_copy():
    from edgeus.models.layers import GhostModule
    from edgeus.models.profile import count_macs

    torch.manual_seed(0)
    g = GhostModule(16, 32, kernel_size=3, relu=False).eval()
    x = torch.randn(1, 16, 10, 10)
    x1 = g.primary_conv(x)
    torch.testing.assert_close(g(x), torch.cat([x1, g.cheap_operation(x1)], 1))
    assert g.primary_conv[0].out_channels == 16 and g.cheap_operation[0].groups == 16
    full = nn.Conv2d(16, 32, 3, padding=1, bias=False)
    assert count_macs(g, 10, 16) < 0.6 * count_macs(full, 10, 16)
    with pytest.raises(ValueError, match="even"):
        GhostModule(8, 7)


VARIANTS = [("dsc_sta", {"attention": "ca"}), ("dsc_sta", {"ghost": True}),
            ("mobilenetv2", {"attention": "ca"}), ("mobilenetv2", {"ghost": True, "attention": "ca"})]


def _variant(name, kw, width=0.25):
    from edgeus.train.run import build_model

    cfg = make_cfg(f"model.name={name}", f"model.width={width}",
                   *(f"model.kwargs.{k}={str(v).lower()}" for k, v in kw.items()))
    return build_model(cfg, 3)


def _lightweight_consistent(model) -> None:
    from edgeus.models.layers import CoordinateAttention, GhostModule

    n_ca = n_ghost = 0
    for m in model.modules():
        if isinstance(m, GhostModule):
            p, c = m.primary_conv[0], m.cheap_operation[0]
            assert p.out_channels == m.primary_conv[1].num_features == c.in_channels == c.out_channels == c.groups
            assert m.cheap_operation[1].num_features == c.out_channels
            n_ghost += 1
        if isinstance(m, CoordinateAttention):
            assert m.conv_h.out_channels == m.conv_w.out_channels == m.conv1.in_channels
            assert m.conv1.out_channels == m.bn1.num_features == m.conv_h.in_channels == m.conv_w.in_channels
            n_ca += 1
    assert n_ca or n_ghost


@pytest.mark.parametrize("name,kw", VARIANTS, ids=[f"{n}-{'-'.join(k)}" for n, k in VARIANTS])
def test_lightweight_variants_train_prune_and_export(name, kw, tmp_path):
    from edgeus.models.layers import CoordinateAttention, GhostModule

    torch.manual_seed(0)
    model = _variant(name, kw)
    assert model.edgeus_arch["kwargs"] == kw
    kinds = {type(m) for m in model.modules()}
    assert (CoordinateAttention in kinds) == (kw.get("attention") == "ca")
    assert (GhostModule in kinds) == bool(kw.get("ghost"))
    # a training step reaches every parameter
    x = torch.randn(4, 1, SIZE, SIZE)
    nn.functional.cross_entropy(model.train()(x), torch.arange(4) % 3).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)
    plain = create_model(name, num_classes=3, width=0.25)
    pruned, rep = _prune(model.eval(), 0.4)
    _lightweight_consistent(pruned)
    # about as much is cut as from the plain model (the Ghost pairs are cut once, not once per root)
    assert 0.2 < rep["macs_ratio"] < 0.6, rep["macs_ratio"]
    if kw.get("ghost"):
        assert rep["structured"]["block_pruners"] == ["GhostModule"]
        assert rep["macs_ratio"] > 0.6 * _prune(plain, 0.4)[1]["macs_ratio"]
    assert pruned(x).shape == (4, 3)
    assert _export_parity(pruned, x) < 1e-4
    again = _roundtrip(pruned, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))


def test_mobilenetv2_with_ca_keeps_torchvision_keys(tmp_path):
    from edgeus.models.pretrained import load_pretrained

    src = create_model("mobilenetv2", num_classes=1000, in_chans=3, width=0.25)
    torch.save(src.state_dict(), tmp_path / "mnv2.pth")
    dst = create_model("mobilenetv2", num_classes=2, in_chans=1, width=0.25, attention="ca")
    report = load_pretrained(dst, tmp_path / "mnv2.pth")
    torch.testing.assert_close(dst.features[5].conv[1][0].weight, src.features[5].conv[1][0].weight)
    assert any(k.startswith("features.2.attention") for k in report["rebuilt_not_loaded"])
    with pytest.raises(ValueError, match="attention"):
        create_model("dsc_sta", width=0.25, attention="cbam")


# --- 3. CP decomposition beside Tucker-2 -----------------------------------------------------------------

def test_cp_recovers_an_exact_low_rank_kernel_and_runs_like_the_conv():
    from edgeus.decompose.cp import cp_decompose

    g = torch.Generator().manual_seed(0)
    r = 5
    A, B, C, D = (torch.randn(n, r, generator=g, dtype=torch.float64) for n in (12, 10, 3, 3))
    W = torch.einsum("or,ir,hr,wr->oihw", A, B, C, D)
    conv = nn.Conv2d(10, 12, 3, stride=2, padding=2, dilation=2, bias=True).double()
    with torch.no_grad():
        conv.weight.copy_(W)
    seq, info = cp_decompose(conv, r, iters=200)
    assert info["ranks"] == [r] and info["rel_error"] < 1e-4
    assert [tuple(m.weight.shape) for m in seq] == [(r, 10, 1, 1), (r, 1, 3, 1), (r, 1, 1, 3), (12, r, 1, 1)]
    x = torch.randn(2, 10, 13, 11, dtype=torch.float64)
    torch.testing.assert_close(seq(x), conv(x), atol=1e-6, rtol=1e-4)


def test_cp_macs_formula_matches_the_counter():
    from edgeus.decompose.cp import cp_macs, cp_rank_for_macs, cp_skeleton
    from edgeus.models.profile import count_macs

    conv = nn.Conv2d(16, 24, (3, 5), stride=(2, 1), padding=(1, 2), bias=True)
    seq = cp_skeleton(conv, 7)
    x = torch.randn(1, 16, 15, 12)
    out = conv(x)
    assert seq(x).shape == out.shape
    assert count_macs(seq, example=x) == cp_macs(16, 24, 7, (3, 5), (15, 12), tuple(out.shape[2:]), bias=True)
    budget = cp_macs(16, 24, 7, (3, 5), (15, 12), tuple(out.shape[2:]), bias=True)
    assert cp_rank_for_macs(16, 24, (3, 5), (15, 12), tuple(out.shape[2:]), budget, bias=True) == 7
    assert cp_rank_for_macs(16, 24, (3, 5), (15, 12), tuple(out.shape[2:]), budget - 1, bias=True) == 6


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ratio", "budget"])
def test_decompose_method_cp_at_the_macs_of_tucker2(mode, tmp_path):
    from edgeus.decompose import decompose_model
    from edgeus.errors import EdgeusError

    torch.manual_seed(0)
    model = create_model("dsc_sta", num_classes=3, width=0.5).eval()
    out = {}
    for method in ("hooi", "cp"):
        cfg = make_cfg(f"decompose.method={method}", f"decompose.rank_mode={mode}", "decompose.finetune_epochs=0",
                       "decompose.ratio=0.5", "decompose.target_macs=0.6", "decompose.cp_iters=10")
        out[method] = decompose_model(model, cfg.decompose, image_size=SIZE, in_chans=1)
    (dm, rep), (_, tuck) = out["cp"], out["hooi"]
    kinds = {e["type"] for e in rep["layers"]}
    assert "cp" in kinds and "tucker2" not in kinds
    assert rep["macs_after"] == rep["macs_formula"]                 # the formula is the counter's
    assert rep["macs_after"] <= tuck["macs_after"]                  # CP at (at most) the Tucker-2 MACs
    if mode == "budget":
        assert rep["budget"]["met"]
    cp_layers = {e["name"]: e for e in rep["layers"] if e["type"] == "cp"}
    tk_layers = {e["name"]: e for e in tuck["layers"] if e["type"] == "tucker2"}
    assert set(cp_layers) <= set(tk_layers)
    for name, e in cp_layers.items():
        assert e["macs_after"] <= tk_layers[name]["macs_after"] and 0 <= e["rel_error"] < 1.0
    rec = dm.edgeus_transforms[-1]
    assert rec["kind"] == "decompose" and rec["method"] == "cp"
    x = torch.randn(2, 1, SIZE, SIZE)
    assert _export_parity(dm, x) < 1e-4
    again = _roundtrip(dm, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), dm.eval()(x))
    with pytest.raises(EdgeusError, match="cp"):
        decompose_model(model, make_cfg("decompose.method=parafac").decompose, image_size=SIZE, in_chans=1)


# --- 4. seed metrics: per-class precision / recall / F1, ROC-AUC, PR-AP, curves -------------------------------

def test_average_precision_and_curves_match_the_textbook_example():
    from edgeus.curves import average_precision, pr_curve, roc_curve

    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]          # scikit-learn's documented example
    assert average_precision(y, s) == pytest.approx(0.8333333333)
    roc = roc_curve(y, s)
    assert roc["fpr"] == [0.0, 0.0, 0.5, 0.5, 1.0] and roc["tpr"] == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert roc["thresholds"] == [None, 0.8, 0.4, 0.35, 0.1]
    pr = pr_curve(y, s)
    assert pr["recall"] == [0.5, 0.5, 1.0, 1.0, 0.0]
    assert pr["precision"] == pytest.approx([1.0, 0.5, 2 / 3, 0.5, 1.0])
    json.dumps(roc), json.dumps(pr)                           # no inf: the report stores them as JSON
    # ties form one threshold; a perfect ranking has AP 1; no positives -> None
    assert roc_curve([0, 1, 1], [0.5, 0.5, 0.5])["fpr"] == [0.0, 1.0]
    assert average_precision([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == 1.0
    assert average_precision([0, 0], [0.3, 0.4]) is None


def test_compute_metrics_reports_pr_ap_per_class_and_class_curves_agree():
    from edgeus.curves import class_curves
    from edgeus.evaluate import compute_metrics

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    classes = ["benign", "malignant", "normal"]
    m = compute_metrics(labels, probs, classes)
    assert set(m["ap_per_class"]) == set(classes)
    assert m["ap"] == pytest.approx(np.mean(list(m["ap_per_class"].values())))
    for c in classes:
        pc = m["per_class"][c]
        assert {"precision", "recall", "f1", "support"} <= set(pc)
    curves = class_curves(labels, probs, classes)
    for c in classes:
        assert curves[c]["ap"] == pytest.approx(m["ap_per_class"][c])
        assert curves[c]["auc"] == pytest.approx(m["auc_per_class"][c])       # trapezoid = rank statistic
        assert curves[c]["positives"] == m["per_class"][c]["support"]
        r = curves[c]["roc"]
        assert r["fpr"][0] == 0.0 and r["fpr"][-1] == 1.0 and r["tpr"][-1] == 1.0
        assert all(a <= b for a, b in zip(r["fpr"], r["fpr"][1:]))
    # AP for one class is the area under its step PR curve, and above the class prior
    assert all(curves[c]["ap"] > curves[c]["positives"] / 200 for c in classes)
    json.dumps(curves)


# --- 5. CAMUS views ---------------------------------------------------------------------------------------------

QUALITY = ["Good", "Medium", "Poor"]


def _frame(view: str, phase: str, rng, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A toy apical view [rows, cols] (uint8) and its labels (1 LV, 2 myocardium, 3 atrium): the 2CH view
    shows one ventricle, the 4CH view two side by side; ES ventricles are smaller."""
    yy, xx = np.mgrid[0:h, 0:w]
    lab = np.zeros((h, w), np.uint8)
    r = 7 if phase == "ED" else 5
    centres = [(16, 24)] if view == "2CH" else [(16, 15), (16, 33)]
    for cy, cx in centres:
        d = ((yy - cy) / (1.6 * r)) ** 2 + ((xx - cx) / r) ** 2
        lab[(d > 1) & (d <= 1.8)] = 2
        lab[d <= 1] = 1
        lab[((yy - 32) / 4) ** 2 + ((xx - cx) / 4) ** 2 <= 1] = 3
    img = 30 + 150 * (lab == 2) + 60 * (lab == 3) + rng.normal(0, 12, (h, w))
    img[:3] = 255                     # a bright band at the top of the image (rows): orientation check
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_camus_tree(root: Path, n_patients: int = 10, seed: int = 0, missing_gt=()) -> Path:
    """The challenge's NIfTI layout, frames stored (width, height) as CAMUS stores them."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for p in range(1, n_patients + 1):
        pid = f"patient{p:04d}"
        d = root / "training" / pid
        d.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            (d / f"Info_{view}.cfg").write_text(
                f"ED: 1\nES: 12\nNbFrame: 12\nSex: F\nAge: {40 + p}\nImageQuality: {QUALITY[p % 3]}\nEF: 55.0\n"
                "FrameRate: 25.0\n")
            for phase in ("ED", "ES"):
                img, lab = _frame(view, phase, rng)
                nib.save(nib.Nifti1Image(img.T.copy(), np.eye(4)), d / f"{pid}_{view}_{phase}.nii.gz")
                if (pid, view, phase) not in missing_gt:
                    nib.save(nib.Nifti1Image(lab.T.copy(), np.eye(4)), d / f"{pid}_{view}_{phase}_gt.nii.gz")
            # the half sequence is there too, and ignored
            half = nib.Nifti1Image(np.zeros((48, 40, 3), np.uint8), np.eye(4))
            nib.save(half, d / f"{pid}_{view}_half_sequence.nii.gz")
    return root


def test_camus_reader_views_masks_quality_and_patient_splits(tmp_path):
    from edgeus.data import build_datasets
    from edgeus.data.camus import read_frame, scan

    root = make_camus_tree(tmp_path / "camus", missing_gt={("patient0003", "4CH", "ES")})
    src = scan(root)
    assert len(src.paths) == 40 and set(src.views) == {"2CH", "4CH"} and set(src.phases) == {"ED", "ES"}
    assert src.qualities[0] == "Medium" and src.info[0]["ES"] == "12"          # patient0001: 1 % 3 -> Medium
    assert len(scan(root, ["Good"]).paths) == 4 * 3                             # patients 3, 6, 9
    frame = read_frame(src.paths[0])
    assert frame.shape == (40, 48) and frame[:3].min() == 1.0                  # transposed back: rows first
    cfg = make_cfg("data=camus", f"data.root={root}", "data.image_size=32", "model.name=simple_cnn")
    b = build_datasets(cfg.data)
    assert b.classes == ["2CH", "4CH"] and b.name == "camus"
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 40
    patients = {s: {Path(i).parent.name for i in b.ids(s)} for s in ("train", "val", "test")}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    for s in ("train", "val", "test"):
        assert b.counts(s)[0] == b.counts(s)[1] > 0                             # both views of every patient
    imgs = b.train.images
    has = dict(zip(imgs.ids, imgs.has_mask))
    assert sum(not v for v in has.values()) == 1
    assert not has[str(root / "training" / "patient0003" / "patient0003_4CH_ES.nii.gz")]
    item = b.train[0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].shape == (1, 32, 32)
    k = int(np.argmax(imgs.has_mask))
    assert 0.05 < imgs.masks[k].mean() < 0.6                                    # the heart's outline, not empty
    # view and phase: chosen by the class names (what a model's fingerprint records)
    cfg4 = make_cfg("data=camus", f"data.root={root}", "data.image_size=32", "data.classes=[4CH_ES,2CH_ED]")
    b4 = build_datasets(cfg4.data)
    assert b4.classes == ["4CH_ES", "2CH_ED"] and sum(b4.counts(s)[0] for s in ("train", "val", "test")) == 10
    from edgeus.errors import DataError

    with pytest.raises(DataError, match="not CAMUS classes"):
        build_datasets(make_cfg("data=camus", f"data.root={root}", "data.classes=[2CH,4CH_ES]").data)
    with pytest.raises(DataError, match="CAMUS"):
        build_datasets(make_cfg("data=camus", f"data.root={tmp_path}").data)


@pytest.mark.slow
def test_efficientnet_cbam_int8_end_to_end_on_a_camus_tree(tmp_path):
    from edgeus.pipeline import compress

    root = make_camus_tree(tmp_path / "camus", n_patients=10)
    cfg = make_cfg("recipe=efficientnet_cbam_int8", "profile=camus", f"data.root={root}", "data.image_size=32",
                   "data.batch_size=16", "model.width=0.125", "train.epochs=2", "train.lr=0.003",
                   "decompose.finetune_epochs=1", "quantize.qat=false", "compress.robustness=false",
                   "compress.latency_iters=3", "gates.enforce=false", "gates.critical_class=4CH", "seed=0",
                   f"out={tmp_path / 'run'}", tiny=False)
    assert cfg.data.name == "camus"
    compress(cfg)
    run = tmp_path / "run"
    ledger = json.loads((run / "ledger.json").read_text())
    stages = [r["stage"] for r in ledger["rows"]]
    assert {"teacher", "decompose", "export", "quantize"} <= set(stages)
    for r in ledger["rows"]:
        if r["stage"] in ("teacher", "decompose", "quantize"):
            assert set(r["metrics"]["recall"]) == {"2CH", "4CH"}, r["stage"]
    assert "4CH" in (run / "ledger.md").read_text()


# --- 6. two-stage as published (seed 001) -------------------------------------------------------------------

def test_two_stage_published_layout_inputs_and_frozen_parts():
    torch.manual_seed(0)
    m = create_model("two_stage_published", num_classes=3, in_chans=1, width=0.125)
    assert type(m.classifier).__name__ == "DenseNet"
    head = m.classifier.classifier
    assert [type(l).__name__ for l in head] == ["Linear", "ReLU"] * 3 + ["Dropout", "Linear"]
    assert [l.out_features for l in head if isinstance(l, nn.Linear)] == [64, 64, 64, 3]
    assert head[6].p == 0.05
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.classifier.") for n in trainable)   # the head only
    m.train()
    assert not m.segmenter.training and not m.classifier.features.norm0.training and head.training
    x = torch.randn(2, 1, SIZE, SIZE)
    inp = m.stage2_input(x)
    assert inp.shape == (2, 3, SIZE, SIZE) and torch.equal(inp[:, 0], x[:, 0]) and torch.equal(inp[:, 1], inp[:, 2])
    torch.testing.assert_close(inp[:, 1:2], m.segment(x))
    img = create_model("two_stage_published", width=0.125, inputs="image", freeze_features=False)
    assert img.segmenter is None
    assert torch.equal(img.stage2_input(x), x.repeat(1, 3, 1, 1))
    assert all(p.requires_grad for p in img.parameters())
    with pytest.raises(ValueError, match="inputs"):
        create_model("two_stage_published", width=0.125, inputs="mask")


def test_two_stage_published_trains_the_unet_first_then_the_head(tmp_path):
    from edgeus.train.run import train_from_config

    cfg = make_cfg("model.name=two_stage_published", "model.width=0.125", "data.image_size=32",
                   "data.n_per_class=8", "data.batch_size=8", "train.epochs=2", "train.lr=0.003",
                   "model.kwargs.seg_epochs=3", f"train.out={tmp_path / 't'}", "train.resume=false")
    torch.manual_seed(0)
    from edgeus.train.run import build_model

    init = build_model(cfg, 3).state_dict()
    result, bundle = train_from_config(cfg)
    model = result.model
    assert (tmp_path / "t" / "segmenter.pt").is_file()
    sd = model.state_dict()
    assert not torch.equal(sd["segmenter.enc.0.0.weight"], init["segmenter.enc.0.0.weight"])      # stage 1 ran
    assert torch.equal(sd["classifier.features.conv0.weight"], init["classifier.features.conv0.weight"])  # frozen
    assert torch.equal(sd["classifier.features.norm0.running_mean"], init["classifier.features.norm0.running_mean"])
    assert not torch.equal(sd["classifier.classifier.0.weight"], init["classifier.classifier.0.weight"])  # the head
    # the U-Net the classifier trained on is the one saved by stage 1
    seg = torch.load(tmp_path / "t" / "segmenter.pt", weights_only=True)
    torch.testing.assert_close(seg["enc.0.0.weight"], sd["segmenter.enc.0.0.weight"])
    # a second call reuses it instead of training again
    rep = model.train_first({"train": [], "val": [], "train_plain": []}, out_dir=tmp_path / "t")
    assert rep["reused"]
    x = torch.randn(2, 1, SIZE, SIZE)
    assert _export_parity(model.eval(), x) < 1e-4


def test_two_stage_published_unet_learns_from_masks_alone():
    from edgeus.data import build_datasets, build_loaders

    cfg = make_cfg("data.image_size=32", "data.n_per_class=12", "data.batch_size=12")
    bundle = build_datasets(cfg.data)
    loaders = build_loaders(bundle, cfg.data)
    torch.manual_seed(0)
    m = create_model("two_stage_published", num_classes=3, width=0.25, seg_epochs=6, seg_lr=3e-3)
    rep = m.train_first(loaders)
    h = rep["history"]
    assert len(h) == 6 and h[-1]["train_bce"] < h[0]["train_bce"]
    assert rep["val_bce"] == min(r["val_bce"] for r in h)
    assert not any(p.requires_grad for p in m.segmenter.parameters()) and not m.segmenter.training


@pytest.mark.slow
def test_two_stage_published_loads_torchvision_densenet_and_prunes_consistently(tmp_path):
    from edgeus.models.pretrained import load_pretrained

    torch.manual_seed(0)
    src = create_model("densenet201", num_classes=1000, in_chans=3, width=0.125)
    torch.save(src.state_dict(), tmp_path / "d201.pth")
    m = create_model("two_stage_published", num_classes=2, in_chans=1, width=0.125)
    report = load_pretrained(m, tmp_path / "d201.pth")
    assert report["target"] == "classifier" and not report["adapted"]          # [image, mask, mask] = 3 channels
    torch.testing.assert_close(m.classifier.features.conv0.weight, src.features.conv0.weight)
    assert any(k.startswith("classifier.0") for k in report["rebuilt_not_loaded"])
    assert any(k.startswith("classifier.") for k in report["unused"])          # the ImageNet head, reported
    pruned, rep = _prune(m, 0.4)
    assert rep["after"]["macs"] < 0.8 * rep["before"]["macs"]
    assert pruned.segmenter.enc[1][0].out_channels < m.segmenter.enc[1][0].out_channels   # the U-Net was traced
    _dense_channels_consistent(pruned.classifier)
    pruned.train()
    assert all(n.startswith("classifier.classifier.") for n, p in pruned.named_parameters() if p.requires_grad)
    x = torch.randn(2, 1, SIZE, SIZE)
    assert _export_parity(pruned.eval(), x) < 1e-4


def test_dice_and_iou_per_image_and_mean():
    from edgeus.segmentation import dice_iou, evaluate_segmentation

    t = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    t[0, 0, :2, :2] = True                       # 4 pixels
    p = torch.zeros_like(t)
    p[0, 0, :2, :1] = True                       # 2 of them: Dice 2*2/6, IoU 2/4
    p[2, 0, 0, 0] = True                         # image 1: both empty -> 1; image 2: only the prediction -> 0
    d, i = dice_iou(p, t)
    torch.testing.assert_close(d, torch.tensor([4 / 6, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(i, torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))

    class Oracle(nn.Module):                    # "segments" by returning the mask it is shown as the image
        def segment(self, x):
            return (x > 0).float()

    batch = {"image": torch.where(t, 1.0, -1.0).float(), "mask": t.float(),
             "has_mask": torch.tensor([True, True, False]), "index": torch.arange(3)}
    res = evaluate_segmentation(Oracle(), [batch])
    assert res["n"] == 2 and res["dice_mean"] == 1.0 and res["iou_mean"] == 1.0
    assert [r["index"] for r in res["per_image"]] == [0, 1]
    m = create_model("two_stage", width=0.125, classifier="simple_cnn")
    big = {**batch, "image": torch.randn(3, 1, SIZE, SIZE), "mask": torch.rand(3, 1, SIZE, SIZE).round()}
    out = evaluate_segmentation(m, [big])
    assert out["n"] == 2 and 0.0 <= out["dice_mean"] <= 1.0 and m.training


@pytest.mark.parametrize("name", ["two_stage", "two_stage_published"])
def test_two_stage_exports_the_mask_as_a_second_onnx_output(name):
    import io
    import warnings

    from edgeus.models.two_stage import WithMask
    from edgeus.onnx.session import session

    torch.manual_seed(0)
    kw = {"classifier": "simple_cnn"} if name == "two_stage" else {}
    m = create_model(name, num_classes=3, width=0.125, **kw).eval()
    wrapped = WithMask(m).eval()
    x = torch.randn(2, 1, SIZE, SIZE)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (x,), f, opset_version=17, dynamo=False, input_names=["image"],
                          output_names=["logits", "mask"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "mask": {0: "batch"}})
    sess = session(f.getvalue(), threads=1)
    assert [o.name for o in sess.get_outputs()] == ["logits", "mask"]
    logits, mask = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref_logits, ref_mask = wrapped(x)
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(mask, ref_mask.numpy(), atol=1e-5)
    torch.testing.assert_close(ref_mask, m.segment(x))
    assert mask.shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="segmenter"):
        WithMask(create_model("two_stage_published", width=0.125, inputs="image"))


def test_cp_ranks_follow_a_targets_channel_multiple():
    from edgeus.decompose import decompose_model

    torch.manual_seed(0)
    model = create_model("dsc_sta", num_classes=3, width=0.5).eval()
    cfg = make_cfg("decompose.method=cp", "decompose.rank_mode=ratio", "decompose.ratio=0.5", "decompose.cp_iters=3",
                   "decompose.finetune_epochs=0", "decompose.pointwise=false", "decompose.linear=false")
    _, rep = decompose_model(model, cfg.decompose, image_size=SIZE, in_chans=1, channel_multiple=8)
    cps = [e for e in rep["layers"] if e["type"] == "cp"]
    assert cps and all(e["ranks"][0] % 8 == 0 and e["ranks"][0] >= 8 for e in cps)


def test_two_stage_published_ground_truth_ablation_trains_through_wrapped_loaders():
    from edgeus.data import build_datasets, build_loaders
    from edgeus.models.two_stage import ground_truth_loaders
    from edgeus.train.trainer import Supervised, fit

    cfg = make_cfg("data.image_size=32", "data.n_per_class=8", "data.batch_size=8", "train.epochs=1")
    bundle = build_datasets(cfg.data)
    loaders = ground_truth_loaders(build_loaders(bundle, cfg.data))
    batch = next(iter(loaders["val"]))
    assert batch["image"].shape[1] == 2 and torch.equal(batch["image"][:, 1:], batch["mask"])
    assert len(loaders["train"]) == len(build_loaders(bundle, cfg.data)["train"])
    torch.manual_seed(0)
    m = create_model("two_stage_published", num_classes=3, width=0.125, inputs="ground_truth")
    assert m.segmenter is None
    x = batch["image"]
    inp = m.stage2_input(x)
    assert torch.equal(inp[:, 1], batch["mask"][:, 0]) and torch.equal(inp[:, 2], batch["mask"][:, 0])
    res = fit(Supervised(m), loaders, cfg.train, None, classes=bundle.classes, preprocessing=bundle.preprocessing)
    assert res.best_metrics["n"] == len(bundle.val)
    with pytest.raises(ValueError, match="ground_truth_loaders"):
        m(batch["image"][:, :1])
