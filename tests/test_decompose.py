"""Low-rank decomposition: exactness at full rank, MACs by formula, budgets, VBMF, ONNX, checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import make_cfg
from edgeus.decompose import decompose_conv, decompose_linear, decompose_model, decompose_pointwise, evbmf
from edgeus.decompose import macs as M
from edgeus.decompose.tucker import tucker2_decompose
from edgeus.models import create_model
from edgeus.models.profile import count_macs

REPO = Path(__file__).resolve().parents[1]


OWN = ("decompose.finetune_epochs=0",)   # this file's override of make_cfg (the image size is per test)


def _decompose(model, cfg, **kw):
    """``decompose_model`` with the config's decompose section, at the config's image size."""
    return decompose_model(model, cfg.decompose, image_size=cfg.data.image_size, in_chans=cfg.data.in_chans, **kw)


class Net(nn.Module):
    """Convolutions of every kind the stage must handle (strides, dilation, bias, depth-wise, groups)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.b = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(32, 48, 1, stride=2)
        self.c = nn.Conv2d(48, 48, (3, 5), padding=(1, 2))
        self.fc1 = nn.Linear(48, 40)
        self.fc2 = nn.Linear(40, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = self.grouped(self.dw(x))
        x = torch.relu(self.c(self.pw(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _with_arch(model: nn.Module, name: str = "simple_cnn", width: float = 0.25):
    model.edgeus_arch = {"name": name, "num_classes": 3, "in_chans": 1, "width": width, "kwargs": {}}
    return model


# --- single layers ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["hosvd", "hooi"])
@pytest.mark.parametrize("conv", [
    dict(in_channels=12, out_channels=20, kernel_size=3, padding=1, bias=True),
    dict(in_channels=16, out_channels=8, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=10, out_channels=14, kernel_size=(3, 5), padding=(2, 4), dilation=2, bias=True),
])
def test_full_rank_tucker_reproduces_the_conv(conv, method):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv).eval()
    seq = decompose_conv(layer, (layer.out_channels, layer.in_channels), method, compact=False).eval()
    assert [type(m) for m in seq] == [nn.Conv2d] * 3
    first, core, last = seq
    assert tuple(first.kernel_size) == (1, 1) and tuple(last.kernel_size) == (1, 1)
    assert core.kernel_size == layer.kernel_size and core.stride == layer.stride
    assert core.padding == layer.padding and core.dilation == layer.dilation
    assert (last.bias is not None) == (layer.bias is not None) and first.bias is None and core.bias is None
    x = torch.randn(2, layer.in_channels, 17, 19)
    with torch.no_grad():
        assert torch.allclose(seq(x), layer(x), atol=1e-4, rtol=0)


def test_compact_drops_full_rank_factors_and_keeps_the_bias():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 24, 3, padding=1, bias=True).eval()
    seq, info = tucker2_decompose(layer, (24, 8), "hosvd")      # both modes full: only the core remains
    assert len(seq) == 1 and info["rel_error"] < 1e-6
    seq, info = tucker2_decompose(layer, (6, 8), "hosvd")       # Tucker-1 on the output mode
    assert len(seq) == 2 and not info["first"] and info["last"] and seq[1].bias is not None
    seq, info = tucker2_decompose(layer, (24, 4), "hosvd")      # input mode only: the core carries the bias
    assert len(seq) == 2 and info["first"] and not info["last"] and seq[1].bias is not None


def test_full_rank_svd_reproduces_linear_and_pointwise():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16).eval()
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert torch.allclose(decompose_linear(lin, 16)(x), lin(x), atol=1e-4, rtol=0)
    pw = nn.Conv2d(12, 20, 1, stride=2, bias=True).eval()
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        assert torch.allclose(decompose_pointwise(pw, 12)(x), pw(x), atol=1e-4, rtol=0)


def test_hooi_error_not_above_hosvd_and_error_falls_with_rank():
    torch.manual_seed(0)
    layer = nn.Conv2d(32, 32, 3, padding=1)
    e = {m: tucker2_decompose(layer, (8, 8), m)[1]["rel_error"] for m in ("hosvd", "hooi")}
    assert e["hooi"] <= e["hosvd"] + 1e-9
    errs = [tucker2_decompose(layer, (r, r), "hosvd")[1]["rel_error"] for r in (4, 8, 16, 24)]
    assert all(a > b for a, b in zip(errs, errs[1:]))


def test_lower_ranks_reduce_macs_exactly_as_computed():
    torch.manual_seed(0)
    size = 20
    for conv in (nn.Conv2d(16, 24, 3, padding=1, bias=True), nn.Conv2d(16, 24, 5, stride=2, padding=2, bias=False)):
        before = count_macs(conv, size, conv.in_channels)
        out_hw = conv(torch.zeros(1, conv.in_channels, size, size)).shape[-2:]
        assert before == M.conv_macs(16, 24, conv.kernel_size, out_hw, bias=conv.bias is not None)
        for r_out, r_in in ((8, 4), (24, 6), (5, 16)):
            seq = decompose_conv(conv, (r_out, r_in), "hosvd")
            formula = M.tucker2_macs(16, 24, r_in, r_out, conv.kernel_size, (size, size), tuple(out_hw),
                                     bias=conv.bias is not None, first=r_in < 16, last=r_out < 24)
            assert count_macs(seq, size, 16) == formula < before
    lin = nn.Linear(64, 32)
    assert count_macs(nn.Sequential(nn.Flatten(), decompose_linear(lin, 8)), 8, 1) == M.svd_linear_macs(64, 32, 8, bias=True)
    pw = nn.Conv2d(32, 64, 1, stride=2)
    assert count_macs(decompose_pointwise(pw, 8), 16, 32) == M.svd_conv_macs(32, 64, 8, (8, 8), bias=True)


# --- whole models ----------------------------------------------------------------------------

def test_model_macs_match_formula_and_unsupported_layers_are_listed():
    torch.manual_seed(0)
    net = Net().eval()
    cfg = make_cfg(*OWN, "data.image_size=32", "decompose.rank_mode=ratio", "decompose.ratio=0.25", "decompose.rank_multiple=1")
    out, rep = _decompose(net, cfg)
    assert rep["macs_after"] == rep["macs_formula"] == count_macs(out, 32, 1)
    assert rep["macs_before"] == count_macs(net, 32, 1) > rep["macs_after"]
    for e in rep["layers"]:
        assert e["macs_after"] < e["macs_before"]
        assert 0.0 <= e["rel_error"] < 1.0
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "depth-wise" in reasons["dw"] and "grouped" in reasons["grouped"]
    assert "tiny" in reasons["fc2"]
    done = {e["name"]: e for e in rep["layers"]}
    assert {"a", "b", "c", "pw", "fc1"} <= set(done)
    assert done["a"]["ranks"] == [8, 4] and done["pw"]["type"] == "svd_conv" and done["fc1"]["type"] == "svd_linear"
    assert isinstance(out.a, nn.Sequential) and isinstance(net.a, nn.Conv2d)   # the input model is untouched
    json.dumps(rep)
    # pointwise / linear switched off: listed, not decomposed
    _, rep = _decompose(net, make_cfg(*OWN, "data.image_size=32", "decompose.rank_mode=ratio", "decompose.pointwise=false", "decompose.linear=false",
                                       "decompose.exclude=[b]"))
    reasons = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "1x1" in reasons["pw"] and "linear" in reasons["fc1"] and "exclude" in reasons["b"]


@pytest.mark.parametrize("target", [0.35, 0.5, 0.7])
def test_budget_mode_meets_its_budget_within_2_percent(target):
    torch.manual_seed(0)
    model = create_model("simple_cnn", width=0.5).eval()
    _, rep = _decompose(model, make_cfg(*OWN, "data.image_size=48", "decompose.rank_mode=budget", f"decompose.target_macs={target}"))
    achieved = rep["macs_after"] / rep["macs_before"]
    assert rep["budget"]["feasible"] and rep["budget"]["met"]
    assert achieved <= target + 1e-9 and abs(achieved - target) <= 0.02 * target
    assert rep["macs_after"] == rep["macs_formula"]


def test_budget_mode_on_rsmas_and_unreachable_budgets_are_reported():
    torch.manual_seed(0)
    model = create_model("rsmas", num_classes=3, in_chans=1, width=0.125).eval()
    _, rep = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.target_macs=0.5", "decompose.method=hosvd"))
    achieved = rep["macs_after"] / rep["macs_before"]
    assert abs(achieved - 0.5) <= 0.01 and achieved <= 0.5 + 1e-9
    assert rep["macs_after"] == rep["macs_formula"]
    kinds = {s["reason"] for s in rep["skipped"]}
    assert any("grouped" in k for k in kinds) and any("depth-wise" in k for k in kinds)
    _, rep = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.target_macs=0.01", "decompose.method=hosvd"))
    assert not rep["budget"]["feasible"] and not rep["budget"]["met"]


def test_rank_modes_energy_ratio_vbmf():
    torch.manual_seed(0)
    model = create_model("simple_cnn", width=0.5).eval()
    ranks = {}
    for e in (0.6, 0.9):
        _, rep = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.rank_mode=energy", f"decompose.energy={e}", "decompose.rank_multiple=1", "decompose.method=hosvd"))
        ranks[e] = {x["name"]: x["ranks"] for x in rep["layers"]}
    for name, r in ranks[0.9].items():
        if name in ranks[0.6]:
            assert all(a <= b for a, b in zip(ranks[0.6][name], r))
    _, rep = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.rank_mode=vbmf", "decompose.method=hosvd"))
    assert rep["rank_mode"] == "vbmf" and rep["macs_after"] == rep["macs_formula"]


def test_evbmf_recovers_the_rank_of_low_rank_plus_noise():
    rng = np.random.default_rng(0)
    for L, Mcols, r, noise in ((40, 90, 5, 0.1), (64, 576, 12, 0.3), (90, 60, 7, 0.05)):
        Y = rng.standard_normal((L, r)) @ rng.standard_normal((r, Mcols)) + noise * rng.standard_normal((L, Mcols))
        out = evbmf(Y)
        assert out["rank"] == r
        assert abs(out["sigma2"] / noise ** 2 - 1) < 0.25


def test_decomposed_model_exports_to_onnx_and_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_model("rsmas", num_classes=3, in_chans=1, width=0.125).eval()
    out, _ = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.target_macs=0.5", "decompose.method=hosvd"))
    out.eval()
    x = torch.randn(2, 1, 32, 32)
    path = tmp_path / "dec.onnx"
    torch.onnx.export(out, (x,), str(path), input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamo=False, dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}})
    import onnx

    graph = onnx.load(str(path)).graph
    assert {n.op_type for n in graph.node} >= {"Conv"}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        want = out(x).numpy()
    assert np.allclose(got, want, atol=1e-4, rtol=1e-3)


def test_checkpoint_of_a_decomposed_model_reloads_in_a_fresh_process(tmp_path):
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("simple_cnn", width=0.5).eval()
    out, rep = _decompose(model, make_cfg(*OWN, "data.image_size=32", "decompose.target_macs=0.5"))
    assert out.edgeus_transforms[-1]["kind"] == "decompose"
    path = tmp_path / "dec.pt"
    pre = {"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]}
    save_checkpoint(path, out, classes=["normal", "benign", "malignant"], preprocessing=pre)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        want = out.eval()(x)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from edgeus.train.checkpoint import load_checkpoint\n"
        f"m, _ = load_checkpoint({str(path)!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)\n"
        f"with torch.no_grad(): torch.save(m.eval()(x), {str(tmp_path / 'y.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120,
                   env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.allclose(got, want, atol=1e-6)
    # and in this process, decomposing twice replays both records in order
    again, _ = _decompose(out, make_cfg(*OWN, "data.image_size=32", "decompose.rank_mode=ratio", "decompose.ratio=0.5", "decompose.pointwise=false"))
    save_checkpoint(path, again, classes=["a", "b", "c"], preprocessing=pre)
    loaded, ckpt = load_checkpoint(path)
    assert [t["kind"] for t in ckpt["transforms"]] == ["decompose", "decompose"]
    with torch.no_grad():
        assert torch.allclose(loaded(x), again.eval()(x), atol=1e-6)


def test_finetune_after_decomposition_and_cli(tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.data import build_datasets
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = make_cfg("data.image_size=32", "data.n_per_class=6", "data.batch_size=8", "train.max_steps_per_epoch=2",
                   "decompose.finetune_epochs=1", "decompose.target_macs=0.6", "decompose.lr=0.001")
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("simple_cnn", width=0.25)
    from edgeus.finetune import make_finetuner

    ft = make_finetuner(cfg, bundle)
    out, rep = _decompose(model, cfg, finetune=ft, calib_loader=ft.loaders["train_plain"], out_dir=tmp_path / "run")
    assert rep["finetune"]["epochs"] == 1 and "accuracy" in rep["finetune"]["best_metrics"]
    assert rep["bn_recalibrated_batches"] > 0
    json.dumps(rep)

    src = tmp_path / "model.pt"
    save_checkpoint(src, model, classes=bundle.classes, preprocessing=bundle.preprocessing)
    dst = tmp_path / "small.pt"
    rc = main(["decompose", str(src), f"out={dst}", "decompose.finetune_epochs=0", "decompose.target_macs=0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MACs" in printed and "rel. error" in printed
    loaded, ckpt = load_checkpoint(dst)
    assert ckpt["classes"] == bundle.classes
    assert ckpt["extra"]["decompose"]["macs_after"] == count_macs(loaded, 32, 1)
    assert json.loads(dst.with_suffix(".decompose.json").read_text())["budget"]["met"]
    assert main(["decompose", str(src), "decompose.rank_mode=nonsense"]) == 2


def test_batchnorm_recalibration_re_estimates_statistics_only():
    from edgeus.decompose.api import recalibrate_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    model[1].running_mean.fill_(5.0)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    batches = [{"image": torch.randn(8, 1, 6, 6) * 2 + 1} for _ in range(3)]
    assert recalibrate_batchnorm(model, batches, 2) == 2
    with torch.no_grad():
        acts = torch.cat([model[0](b["image"]) for b in batches[:2]])
    assert torch.allclose(model[1].running_mean, acts.mean((0, 2, 3)), atol=1e-4)
    assert not model.training and model[1].momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


class _Stem(nn.Module):
    """A 1-channel 7x7 stem (the issue-18 case: Tucker-2 made it one 7x7 filter and a 1x1 expansion) and
    a few wider layers, so a tight budget pushes ranks down."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 7, padding=3, bias=False)
        self.b = nn.Conv2d(8, 48, 3, padding=1)
        self.c = nn.Conv2d(48, 64, 3, padding=1)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.b(torch.relu(self.conv1(x))))).mean((2, 3)))


def _ranks(rep):
    return {e["name"]: (e["ranks"], e["full_ranks"]) for e in rep["layers"]}


def test_no_rank_1_core_unless_asked():
    torch.manual_seed(0)
    over = ("data.image_size=16", "decompose.method=hosvd", "decompose.rank_mode=ratio", "decompose.ratio=0.1",
            "decompose.rank_multiple=1")
    _, rep = _decompose(_Stem(), make_cfg(*OWN, *over, "decompose.min_rank=1"))
    assert _ranks(rep)["conv1"][0] == [1, 1]          # what the old floor allowed: a rank-1 stem
    _, rep = _decompose(_Stem(), make_cfg(*OWN, *over))
    assert rep["min_rank"] == 2
    for name, (ranks, full) in _ranks(rep).items():
        assert all(r >= 2 or f == 1 for r, f in zip(ranks, full)), (name, ranks, full)


def test_a_targets_channel_multiple_sets_the_ranks():
    torch.manual_seed(0)
    cfg = make_cfg(*OWN, "data.image_size=16", "decompose.method=hosvd", "decompose.target_macs=0.5")
    out, rep = _decompose(_Stem(), cfg, channel_multiple=16)
    assert rep["channel_multiple"] == 16 and rep["n_decomposed"] >= 1
    for name, (ranks, full) in _ranks(rep).items():
        assert all(r == f or (r % 16 == 0 and r >= 16) for r, f in zip(ranks, full)), (name, ranks, full)
        assert name != "conv1"                          # 8 output channels, at most the multiple: left whole
    assert out(torch.randn(1, 1, 16, 16)).shape == (1, 3)
