"""The model zoo: every registered model builds tiny, trains, exports to ONNX with parity; the RSMAS
modules (SRU, CRU, MDTA) behave as the paper says; pretrained weights load or fail clearly."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeus.errors import CheckpointError
from edgeus.models import create_model, list_models
from edgeus.models.pretrained import load_pretrained
from edgeus.models.profile import count_params
from edgeus.models.rsmas import CRU, MDTA, SCConv, SRU

TINY = 0.125
SIZE = 32
ALL = list_models()
EXPECTED = {"resnet50", "rsmas", "efficientnet_b0_cbam", "dsc_sta", "mobilenetv2", "two_stage", "simple_cnn"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: intra-op threads only add contention (10x slower under load)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batch(n=4, in_chans=1, size=SIZE, num_classes=3, has_mask=None):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.7).float()
    return {
        "image": torch.randn(n, in_chans, size, size, generator=g),
        "label": torch.arange(n) % num_classes,
        "mask": mask,
        "has_mask": torch.ones(n, dtype=torch.bool) if has_mask is None else torch.tensor(has_mask),
        "index": torch.arange(n),
    }


def test_registry_lists_the_zoo():
    assert EXPECTED <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_tiny_forward_and_training_step(name):
    from edgeus.train.trainer import Supervised

    torch.manual_seed(0)
    for in_chans in (1, 3):
        model = create_model(name, num_classes=3, in_chans=in_chans, width=TINY)
        assert model.edgeus_arch["name"] == name
        trainable = Supervised(model)
        trainable.train()
        batch = _batch(4, in_chans)
        logits, losses = trainable.forward_train(batch)
        assert logits.shape == (4, 3)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        loss.backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        opt.step()
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(1, in_chans, 48, 48))  # batch 1, another input size
        assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_onnx_export_matches_torch(name):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, width=TINY).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: torch 2.13's default (dynamo=True) needs onnxscript, not installed here
        torch.onnx.export(model, (torch.randn(2, 1, SIZE, SIZE),), f, opset_version=17, dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(f.getvalue())
    onnx.checker.check_model(proto)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, SIZE, SIZE)  # another batch size than the export's
    with torch.no_grad():
        ref = model(x).numpy()
    out = sess.run(None, {"image": x.numpy()})[0]
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "two_stage_published" else n
                                  for n in ALL])
def test_edgeus_train_on_phantom(name, tmp_path):
    from edgeus.config import compose
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.run import train_from_config

    overrides = ["data=phantom", f"model.name={name}", f"model.width={TINY}", "data.n_per_class=6",
                 f"data.image_size={SIZE}", "train.epochs=1", "data.batch_size=6", "train.max_steps_per_epoch=2",
                 f"train.out={tmp_path}", "train.resume=false"]
    if name == "rsmas":
        overrides.append("model.kwargs.mdta_blocks=[1,2]")  # a list through the config: must checkpoint cleanly
    result, bundle = train_from_config(compose(overrides))
    assert result.best_path is not None and result.best_path.exists()
    model, ckpt = load_checkpoint(result.best_path)
    assert ckpt["arch"]["name"] == name
    assert model(torch.randn(2, 1, SIZE, SIZE)).shape == (2, len(bundle.classes))


def test_unknown_kwarg_raises():
    for name in ALL:
        with pytest.raises(TypeError, match="unknown argument"):
            create_model(name, width=TINY, no_such_argument=1)


def test_rsmas_full_width_smaller_than_resnet50():
    r50 = count_params(create_model("resnet50", num_classes=2, in_chans=1))
    rs = count_params(create_model("rsmas", num_classes=2, in_chans=1))
    assert rs < r50
    assert 15e6 < rs < 20e6  # the paper's 17.6 M, with SCConv/MDTA at the 512-channel bottleneck


# --- SCConv: SRU and CRU -------------------------------------------------------------------------

def test_sru_gate_splits_informative_from_uninformative_channels():
    c = 32
    sru = SRU(c, gn_groups=4, gate_threshold=0.5).eval()
    informative = torch.zeros(c, dtype=torch.bool)
    informative[torch.tensor([0, 3, 5, 8, 13, 21, 30])] = True
    with torch.no_grad():
        sru.gn.weight.fill_(0.01)                       # normalised part negligible
        sru.gn.bias.copy_(torch.where(informative, 2.0, -2.0))
    x = torch.randn(2, c, 6, 6)
    w1, w2 = sru.gate(x)
    assert torch.equal(w1 + w2, torch.ones_like(w1))
    assert bool((w1[:, informative] == 1).all()) and bool((w1[:, ~informative] == 0).all())
    # cross reconstruction: X1[:C/2] + X2[C/2:], X1[C/2:] + X2[:C/2]
    x1, x2 = w1 * x, w2 * x
    h = c // 2
    expected = torch.cat([x1[:, :h] + x2[:, h:], x1[:, h:] + x2[:, :h]], dim=1)
    torch.testing.assert_close(sru(x), expected)


def test_sru_gate_is_hard_but_gamma_learns():
    sru = SRU(16, gn_groups=4).train()
    x = torch.randn(2, 16, 5, 5)
    w1, _ = sru.gate(x)
    assert set(torch.unique(w1.detach()).tolist()) <= {0.0, 1.0}
    sru(x).square().sum().backward()
    assert sru.gn.weight.grad is not None and sru.gn.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha,r,groups", [(0.5, 2, 2), (0.25, 2, 2), (0.5, 4, 4)])
def test_cru_output_shape_and_split_attributes(alpha, r, groups):
    c = 64
    cru = CRU(c, alpha=alpha, squeeze_ratio=r, groups=groups)
    assert cru.up_channels == int(alpha * c) and cru.up_channels + cru.low_channels == c
    assert cru.up_squeezed == cru.up_channels // r and cru.low_squeezed == cru.low_channels // r
    assert cru.gwc.groups == groups
    x = torch.randn(2, c, 7, 9)
    assert cru(x).shape == x.shape
    assert SCConv(c, alpha, r, groups, gn_groups=8)(x).shape == x.shape


def test_cru_fusion_is_a_per_channel_softmax_of_the_two_branches():
    cru = CRU(16)
    x = torch.randn(1, 16, 4, 4)
    up, low = torch.split(x, [cru.up_channels, cru.low_channels], dim=1)
    up, low = cru.squeeze1(up), cru.squeeze2(low)
    y1 = cru.gwc(up) + cru.pwc1(up)
    y2 = torch.cat([cru.pwc2(low), low], dim=1)
    s = torch.stack([y1.mean((2, 3)), y2.mean((2, 3))])
    beta = torch.softmax(s, dim=0)[..., None, None]
    torch.testing.assert_close(cru(x), beta[0] * y1 + beta[1] * y2)


# --- MDTA ------------------------------------------------------------------------------------------

def test_mdta_attention_is_channel_by_channel_per_head():
    c, heads = 32, 4
    mdta = MDTA(c, num_heads=heads)
    for h, w in ((6, 5), (11, 13)):
        x = torch.randn(2, c, h, w)
        attn = mdta.attention(x)
        assert attn.shape == (2, heads, c // heads, c // heads)  # C x C per head, not HW x HW
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, c // heads))
        assert mdta(x).shape == x.shape
    assert mdta.temperature.shape == (heads, 1, 1)
    assert mdta.qkv.kernel_size == (1, 1) and mdta.qkv_dwconv.groups == 3 * c  # 1x1 then 3x3 depth-wise


def test_mdta_is_residual():
    mdta = MDTA(16, num_heads=2)
    nn.init.zeros_(mdta.project_out.weight)
    x = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(mdta(x), x)


# --- two-stage ------------------------------------------------------------------------------------

def test_two_stage_segmenter_learns_only_from_masks():
    torch.manual_seed(0)
    model = create_model("two_stage", num_classes=3, in_chans=1, width=TINY, classifier="simple_cnn")
    batch = _batch(4, has_mask=[True, False, True, False])
    logits = model(batch["image"])
    assert logits.shape == (4, 3)
    assert model.last_mask_logits.shape == (4, 1, SIZE, SIZE)
    torch.nn.functional.cross_entropy(logits, batch["label"]).backward(retain_graph=True)
    assert all(p.grad is None for p in model.segmenter.parameters())  # the mask is detached
    seg = model.auxiliary_loss(batch)["seg"]
    # the samples without a mask do not count: same loss as on the two masked samples alone
    model.eval()
    with torch.no_grad():
        model(batch["image"])
        full = model.auxiliary_loss(batch)["seg"]
        sub = {k: v[[0, 2]] for k, v in batch.items()}
        model(sub["image"])
        only = model.auxiliary_loss(sub)["seg"]
        model(batch["image"])
        none = model.auxiliary_loss({**batch, "has_mask": torch.zeros(4, dtype=torch.bool)})["seg"]
    torch.testing.assert_close(full, only)
    assert float(none) == 0.0 and torch.isfinite(seg)
    assert model.segment(batch["image"]).shape == (4, 1, SIZE, SIZE)


# --- pretrained weights ---------------------------------------------------------------------------

def test_pretrained_resnet50_three_channels_into_one_channel_two_classes(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet50", num_classes=3, in_chans=3, width=0.25)
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = create_model("resnet50", num_classes=2, in_chans=1, width=0.25)
    fc_before = dst.fc.weight.detach().clone()
    report = load_pretrained(dst, path)
    torch.testing.assert_close(dst.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(dst.layer3[2].conv2.weight, src.layer3[2].conv2.weight)
    torch.testing.assert_close(dst.layer4[0].bn3.running_var, src.layer4[0].bn3.running_var)
    assert torch.equal(dst.fc.weight, fc_before) and dst.fc.weight.shape == (2, src.fc.in_features)
    assert set(report["head_reinitialised"]) == {"fc.weight", "fc.bias"}
    assert "conv1.weight" in report["adapted"]
    # a grey image through summed filters = the same image repeated as RGB through the original
    src.eval(), dst.eval()
    x = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(dst.conv1(x), src.conv1(x.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)


def test_pretrained_resnet50_into_rsmas_backbone(tmp_path):
    src = create_model("resnet50", num_classes=3, in_chans=3, width=0.25)
    path = tmp_path / "r50.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("rsmas", num_classes=2, in_chans=1, width=0.25)
    report = load_pretrained(dst, path)
    for key in ("layer1.0.conv1.weight", "layer3.5.conv3.weight", "layer2.0.downsample.1.running_mean"):
        torch.testing.assert_close(dst.state_dict()[key], src.state_dict()[key])
    assert any(k.startswith("layer4.0.conv2") for k in report["unused"])       # reported, not silent
    assert any(k.startswith("layer4.0.mixer") for k in report["rebuilt_not_loaded"])


def test_pretrained_from_another_architecture_fails_clearly(tmp_path):
    path = tmp_path / "mnv2.pth"
    torch.save(create_model("mobilenetv2", width=0.25).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit ResNet"):
        load_pretrained(create_model("resnet50", width=0.25), path)
    path2 = tmp_path / "r50.pth"
    torch.save(create_model("resnet50", width=0.25).state_dict(), path2)
    with pytest.raises(CheckpointError, match=r"layer1\.0\.conv1\.weight file"):  # another width: shapes named
        load_pretrained(create_model("resnet50", width=0.5), path2)
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 3}, bad)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_pretrained(create_model("resnet50", width=0.25), bad)


def test_pretrained_into_two_stage_classifier(tmp_path):
    src = create_model("resnet50", num_classes=3, in_chans=3, width=TINY)
    path = tmp_path / "r50.pth"
    torch.save(src.state_dict(), path)
    dst = create_model("two_stage", num_classes=3, in_chans=1, width=TINY)
    report = load_pretrained(dst, path)
    assert report["target"] == "classifier"
    torch.testing.assert_close(dst.classifier.conv1.weight, src.conv1.weight)  # [image, mask, mask] = 3 channels


# --- the `edgeus models` command ---------------------------------------------------------------------

def test_models_command_lists_params_and_macs(capsys):
    from edgeus.cli import main

    assert main(["models", f"model.width={TINY}", f"data.image_size={SIZE}"]) == 0
    out = capsys.readouterr().out
    for name in ALL:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        params, macs = (int(v.replace(",", "")) for v in line.split()[1:3])
        assert params > 0 and macs > 0
    assert main(["models", "rsmas", "--classes", "2", f"model.width={TINY}", f"data.image_size={SIZE}"]) == 0
    assert "mdta_blocks" in capsys.readouterr().out
    assert main(["models", "rsma"]) == 2
    assert "Did you mean rsmas" in capsys.readouterr().err
