"""Knowledge distillation: each loss against values computed by hand, DKD's decomposition,
feature adapters, hook hygiene, pair validation, and a tiny end-to-end run on the phantom."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from conftest import make_cfg
from edgeus.distill import (DistillConfig, Outputs, TermInfo, at_loss, attention_map, build_distiller,
                            count_hooks, default_feature_module, distill, dkd_loss, dkd_terms, kd_loss)
from edgeus.distill.base import PairInfo, resolve_weights
from edgeus.distill.fitnet import FitNet
from edgeus.errors import EdgeusError
from edgeus.models import create_model


def _run_distill(student, teacher, cfg, bundle, out_dir=None):
    """The distill stage as the pipeline composes it: the config's sections, loaders of ``bundle``."""
    from edgeus.data import build_loaders

    w = bundle.class_weights() if cfg.data.balance == "weights" else None
    return distill(student, teacher, cfg.distill, loaders=build_loaders(bundle, cfg.data), train_cfg=cfg.train,
                   classes=bundle.classes, preprocessing=bundle.preprocessing, class_weights=w, seed=int(cfg.seed),
                   out_dir=out_dir)


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


S = [[1.0, 2.0, 0.5], [0.2, -1.0, 3.0]]
T = [[2.0, 0.5, -1.0], [0.0, 1.0, 2.5]]
Y = [0, 2]


# ---------------------------------------------------------------- logit losses, by hand

def test_kd_matches_hand_computation():
    temp = 2.0
    want = temp ** 2 * sum(_kl(_softmax(t, temp), _softmax(s, temp)) for s, t in zip(S, T)) / 2
    got = kd_loss(torch.tensor(S), torch.tensor(T), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(kd_loss(torch.tensor(T), torch.tensor(T), temp)) == pytest.approx(0.0, abs=1e-7)


def test_kd_and_dkd_weight_each_image_by_its_class_like_cross_entropy():
    temp = 2.0
    per = [temp ** 2 * _kl(_softmax(t, temp), _softmax(s, temp)) for s, t in zip(S, T)]
    cw = torch.tensor([1.0, 1.0, 3.0])                  # class 2 (the second image's) counts three times
    w = cw[torch.tensor(Y)]
    assert float(kd_loss(torch.tensor(S), torch.tensor(T), temp, w)) == pytest.approx(
        (per[0] + 3 * per[1]) / 4, rel=1e-5)
    # through the distiller's term: the TermInfo's class weights reach KD and DKD
    from edgeus.distill.base import Outputs, TermInfo
    from edgeus.distill.dkd import DKD
    from edgeus.distill.kd import KD
    from edgeus.distill.config import DistillConfig

    out = Outputs(torch.tensor(S), torch.tensor(T), torch.tensor(Y))
    dcfg = DistillConfig(temperature=temp)
    kd_w, kd_u = KD(dcfg, TermInfo(3, cw)), KD(dcfg, TermInfo(3))
    assert float(kd_w(out)) == pytest.approx((per[0] + 3 * per[1]) / 4, rel=1e-5)
    assert float(kd_u(out)) == pytest.approx(sum(per) / 2, rel=1e-5)
    assert float(KD(dcfg, TermInfo(3, torch.full((3,), 2.0)))(out)) == pytest.approx(sum(per) / 2, rel=1e-5)
    hand = [_dkd_by_hand(s, t, y, temp) for s, t, y in zip(S, T, Y)]
    tckd, _ = dkd_terms(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temp, w)
    assert float(tckd) == pytest.approx((hand[0][0] + 3 * hand[1][0]) / 4, rel=1e-5)
    assert float(DKD(dcfg, TermInfo(3, cw))(out)) != pytest.approx(float(DKD(dcfg, TermInfo(3))(out)))


def _dkd_by_hand(s, t, y, temp):
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    rest_s = [p / (1 - ps[y]) for i, p in enumerate(ps) if i != y]
    rest_t = [p / (1 - pt[y]) for i, p in enumerate(pt) if i != y]
    return tckd, _kl(rest_t, rest_s), _kl(pt, ps), pt[y]


def test_dkd_terms_match_definitions_and_total():
    temp = 3.0
    hand = [_dkd_by_hand(s, t, y, temp) for s, t, y in zip(S, T, Y)]
    tckd, nckd = dkd_terms(torch.tensor(S), torch.tensor(T), torch.tensor(Y), temp)
    assert float(tckd) == pytest.approx(sum(h[0] for h in hand) / 2, rel=1e-5)
    assert float(nckd) == pytest.approx(sum(h[1] for h in hand) / 2, rel=1e-5)
    alpha, beta = 0.7, 5.0
    total = dkd_loss(torch.tensor(S), torch.tensor(T), torch.tensor(Y), alpha, beta, temp)
    assert float(total) == pytest.approx(temp ** 2 * (alpha * float(tckd) + beta * float(nckd)), rel=1e-6)


def test_classical_kd_decomposes_into_tckd_and_nckd():
    # Zhao et al. 2022, eq. (1): KL(p_t || p_s) = TCKD + (1 - p_t,g) * NCKD, sample by sample
    temp = 1.5
    for s, t, y in zip(S, T, Y):
        tckd, nckd = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), temp)
        _, _, kl, pt_g = _dkd_by_hand(s, t, y, temp)
        assert float(tckd) + (1 - pt_g) * float(nckd) == pytest.approx(kl, rel=1e-5)
        assert float(kd_loss(torch.tensor([s]), torch.tensor([t]), temp)) == pytest.approx(temp ** 2 * kl, rel=1e-5)


def test_dkd_is_finite_with_a_confident_teacher():
    s = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[200.0, -200.0, 0.0]])
    loss = dkd_loss(s, t, torch.tensor([0]), 1.0, 8.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- feature losses

def test_attention_map_is_normalised_and_at_loss_by_hand():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])      # N=1, C=2, H=1, W=2
    q = attention_map(f, p=2)
    # mean_c f^2 = [(1 + 9) / 2, (4 + 0) / 2] = [5, 2], normalised by sqrt(29)
    assert q.tolist()[0] == pytest.approx([5 / math.sqrt(29), 2 / math.sqrt(29)], rel=1e-6)
    assert float(q.norm(dim=1)) == pytest.approx(1.0)
    g = torch.tensor([[[[2.0, 2.0]]]])                      # one channel: map [4, 4] -> [1/sqrt2, 1/sqrt2]
    want = ((5 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2 + (2 / math.sqrt(29) - 1 / math.sqrt(2)) ** 2) / 2
    assert float(at_loss(f, g)) == pytest.approx(want, rel=1e-5)
    # invariant to the scale of the features, zero for the same map
    assert float(at_loss(f * 10, f)) == pytest.approx(0.0, abs=1e-7)


def test_fitnet_adapter_maps_channels_and_aligns_sizes():
    pairs = [PairInfo("t.a", "s.a", (16, 8, 8), (4, 4, 4)), PairInfo("t.b", "s.b", (8, 4, 4), (12, 8, 8))]
    info = TermInfo(num_classes=3, pairs=pairs)
    fs = [torch.randn(2, 4, 4, 4), torch.randn(2, 12, 8, 8)]
    ft = [torch.randn(2, 16, 8, 8), torch.randn(2, 8, 4, 4)]
    for align in ("pool", "interpolate"):
        term = FitNet(DistillConfig(align=align), info)
        conv = [a[0] for a in term.adapters]
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in conv] == [(4, 16, (1, 1)), (12, 8, (1, 1))]
        assert all(isinstance(a[1], nn.BatchNorm2d) for a in term.adapters)
        loss = term(Outputs(torch.zeros(2, 3), None, torch.zeros(2, dtype=torch.long), fs, ft))
        loss.backward()
        assert torch.isfinite(loss) and all(c.weight.grad is not None for c in conv)


# ---------------------------------------------------------------- the distiller

def _pair(width_t=0.25, width_s=0.125):
    torch.manual_seed(0)
    return create_model("simple_cnn", width=width_t), create_model("simple_cnn", width=width_s)


def _batch(n=4, size=32):
    return {"image": torch.randn(n, 1, size, size), "label": torch.arange(n) % 3, "index": torch.arange(n)}


def test_teacher_frozen_in_eval_and_adapters_trainable():
    teacher, student = _pair()
    cfg = DistillConfig(losses=["ce", "kd", "fitnet", "at"], pairs=[["features.6", "features.13"]])
    with build_distiller(student, teacher, cfg, image_size=32) as d:
        d.train()
        assert not teacher.training and student.training
        assert not any(p.requires_grad for p in teacher.parameters())
        trainable = {id(p) for p in d.parameters() if p.requires_grad}
        assert {id(p) for p in d.terms["fitnet"].parameters()} <= trainable
        assert {id(p) for p in student.parameters()} <= trainable
        logits, losses = d.forward_train(_batch())
        assert set(losses) == {"ce", "kd", "fitnet", "at"} and logits.shape == (4, 3)
        sum(losses.values()).backward()
        assert all(p.grad is None for p in teacher.parameters())


def test_hooks_are_removed_after_training():
    teacher, student = _pair()
    before = count_hooks(teacher), count_hooks(student)
    cfg = make_cfg("data.n_per_class=6", "data.image_size=32", "data.phantom_size=48", "train.epochs=1",
                   "train.max_steps_per_epoch=1", "distill.losses=[ce,fitnet,at]", "distill.pre_relu=true")
    from edgeus.data import build_datasets

    bundle = build_datasets(cfg.data)
    d = build_distiller(student, teacher, cfg.distill, image_size=32)
    assert count_hooks(teacher) > before[0] and count_hooks(student) > before[1]
    d.close()
    d.close()  # idempotent
    assert (count_hooks(teacher), count_hooks(student)) == before
    _run_distill(student, teacher, cfg, bundle)
    assert (count_hooks(teacher), count_hooks(student)) == before


def test_missing_layer_names_the_nearby_ones():
    teacher, student = _pair()
    cfg = DistillConfig(losses=["ce", "fitnet"], pairs=[["features.6", "featurs.13"]])
    with pytest.raises(EdgeusError) as e:
        build_distiller(student, teacher, cfg, image_size=32)
    msg = str(e.value)
    assert "featurs.13" in msg and "student" in msg and "features.13" in msg
    before = count_hooks(teacher), count_hooks(student)
    with pytest.raises(EdgeusError, match="teacher .*layer3.*nearby names: .*features"):
        build_distiller(student, teacher, DistillConfig(losses=["at"], pairs=[["layer3", "features.6"]]),
                        image_size=32)
    assert (count_hooks(teacher), count_hooks(student)) == before


def test_default_pair_is_the_map_fed_to_global_pooling():
    teacher, _ = _pair()
    assert default_feature_module(teacher, torch.zeros(1, 1, 32, 32)) == "features"

    class Functional(nn.Module):  # pools with x.mean(): falls back to the last spatial map
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.body(x).mean((2, 3)))

    assert default_feature_module(Functional(), torch.zeros(1, 1, 16, 16)) == "body"


class _Block(nn.Module):
    """conv-bn, + identity, then an in-place ReLU: the pre-ReLU map has negatives."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + x)


class _Net(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.block = _Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def test_pre_relu_taps_the_input_of_the_final_relu():
    torch.manual_seed(0)
    teacher, student = _Net(8), _Net(4)
    for pre in (False, True):
        cfg = DistillConfig(losses=["fitnet"], pairs=[["block", "block"]], pre_relu=pre)
        with build_distiller(student, teacher, cfg, image_size=16) as d:
            seen = {}

            def keep(m, i):
                seen["pre"] = i[0].clone()
            h = student.block.relu.register_forward_pre_hook(keep)
            with d.taps.capture("student") as store:
                out = student(torch.randn(2, 1, 16, 16))
            h.remove()
            feat = store[0]
            if pre:
                assert torch.equal(feat, seen["pre"]) and (feat < 0).any()
                assert any("pre_relu: tapped" in n for n in d.taps.notes())
            else:
                assert (feat >= 0).all()
            assert out.shape == (2, 3)
    # a module that does not end with a ReLU is tapped at its output, and the report says so
    cfg = DistillConfig(losses=["at"], pairs=[["stem", "stem"]], pre_relu=True)
    with build_distiller(student, teacher, cfg, image_size=16) as d:
        assert any("output is tapped" in n for n in d.describe()["feature_taps"])


def test_weights_alpha_and_unknown_losses():
    assert resolve_weights(DistillConfig(losses=["ce", "kd"], alpha=0.9)) == {"ce": pytest.approx(0.1), "kd": 0.9}
    assert resolve_weights(DistillConfig(losses=["ce", "dkd"], weights={"dkd": 2.0})) == {"ce": 1.0, "dkd": 2.0}
    with pytest.raises(EdgeusError, match="did you mean 'dkd'"):
        resolve_weights(DistillConfig(losses=["ce", "dk"]))
    with pytest.raises(EdgeusError, match="does not use"):
        resolve_weights(DistillConfig(losses=["ce"], weights={"kd": 1.0}))
    cfg = make_cfg("distill.losses=[ce,dkd,fitnet]", "distill.weights.fitnet=2.5",
                   "distill.pairs=[[layer3,features.13],[layer4,features.18]]")
    assert resolve_weights(cfg.distill)["fitnet"] == 2.5
    assert [list(p) for p in cfg.distill.pairs] == [["layer3", "features.13"], ["layer4", "features.18"]]


def test_weighted_ce_uses_class_weights():
    teacher, student = _pair()
    w = torch.tensor([1.0, 2.0, 0.5])
    with build_distiller(student, teacher, DistillConfig(losses=["ce"]), class_weights=w, image_size=32) as d:
        b = _batch()
        logits, losses = d.forward_train(b)
        want = nn.functional.cross_entropy(logits, b["label"], weight=w)
        assert float(losses["ce"].detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_teacher_logits_cached_by_index():
    teacher, student = _pair()
    calls = []
    h = teacher.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    d = build_distiller(student, teacher, DistillConfig(losses=["ce", "kd"]), image_size=32, cache_teacher=True)
    calls.clear()
    b = _batch()
    d.train()
    d.forward_train(b)
    d.forward_train(b)
    assert calls == [4] and d.cache_hits == 1
    h.remove()
    with torch.no_grad():
        assert torch.allclose(d._teacher_logits(b["image"], b["index"]), teacher(b["image"]), atol=1e-6)
    # with feature losses the tapped teacher features are cached too
    cfg = DistillConfig(losses=["kd", "fitnet"])
    with build_distiller(student, teacher, cfg, image_size=32, cache_teacher=True) as d:
        d.train()
        fresh = d._teacher(b["image"], b["index"])
        cached = d._teacher(b["image"], b["index"])
        assert d.cache_hits == 1 and torch.allclose(fresh[1][0], cached[1][0])
        assert set(d.forward_train(b)[1]) == {"kd", "fitnet"}


def test_cache_teacher_refused_under_augmentation():
    from edgeus.data import build_datasets

    cfg = make_cfg("data.n_per_class=6", "data.image_size=32", "data.phantom_size=48", "train.epochs=1",
                   "train.max_steps_per_epoch=1", "distill.cache_teacher=true", "data.augment=true")
    teacher, student = _pair()
    _, report = _run_distill(student, teacher, cfg, build_datasets(cfg.data))
    assert not report["cache_teacher"] and any("augmented" in n for n in report["notes"])


def test_across_architectures_rsmas_to_dsc_sta():
    teacher = create_model("rsmas", width=0.125)
    student = create_model("dsc_sta", width=0.25)
    cfg = DistillConfig(losses=["ce", "dkd", "fitnet", "at"], pre_relu=True)
    with build_distiller(student, teacher, cfg, image_size=32) as d:
        pair = d.describe()["pairs"][0]
        assert pair["teacher"] == "layer4" and pair["teacher_shape"][0] != pair["student_shape"][0]
        d.train()
        _, losses = d.forward_train(_batch(2))
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
    assert count_hooks(teacher) == 0 and count_hooks(student) == 0


def test_dkd_warmup_ramps_with_the_epoch():
    teacher, student = _pair()
    cfg = DistillConfig(losses=["dkd"], dkd_warmup=2)
    b = _batch()
    d = build_distiller(student, teacher, cfg, image_size=32, steps_per_epoch=2)
    d.train()
    student.eval()  # deterministic student: the loss changes only by the ramp
    vals = [float(d.forward_train(b)[1]["dkd"].detach()) for _ in range(6)]
    full = vals[-1]
    assert full > 0 and vals == pytest.approx([0, full / 4, full / 2, 3 * full / 4, full, full], rel=1e-5)
    # without steps_per_epoch the epochs are counted from the trainer's train() calls
    d = build_distiller(student, teacher, cfg, image_size=32)
    epochs = []
    for _ in range(3):
        d.train()
        for _ in range(2):
            epochs.append(d.epoch)
            d.forward_train(b)
    assert epochs == [0, 0, 1, 1.5, 2, 2.5]


def test_end_to_end_distill_on_the_phantom(tmp_path):
    from edgeus.data import build_datasets

    cfg = make_cfg("data.n_per_class=12", "data.image_size=32", "data.phantom_size=48", "train.epochs=2",
                   "train.lr=3e-3", "distill.losses=[ce,kd,fitnet]", "distill.weights.kd=0.5")
    bundle = build_datasets(cfg.data)
    teacher, student = _pair()
    student, report = _run_distill(student, teacher, cfg, bundle, tmp_path)
    assert report["losses"] == ["ce", "kd", "fitnet"] and report["weights"]["kd"] == 0.5
    assert report["pairs"][0]["teacher"] == "features" and len(report["history"]) == 2
    assert set(report["test"]["recall"]) == set(bundle.classes)
    # the student returned is the best epoch's, and the report's metrics are that student's
    from edgeus.data import build_loaders
    from edgeus.evaluate import predict_torch

    y, p = predict_torch(student, build_loaders(bundle, cfg.data)["val"])
    assert report["val"]["accuracy"] == pytest.approx(float((p.argmax(1) == y).mean()))
    assert report["val"]["accuracy"] == report["history"][report["best_epoch"] - 1]["val_accuracy"]
    assert (tmp_path / "best.pt").is_file()
    assert not student.training
    import json

    json.dumps(report)  # goes into the run ledger


def test_cli_distill(tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    teacher, _ = _pair()
    save_checkpoint(tmp_path / "t.pt", teacher, classes=["normal", "benign", "malignant"],
                    preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    rc = main(["distill", str(tmp_path / "t.pt"), "model.width=0.125", "data.n_per_class=6", "data.phantom_size=48",
               "distill.epochs=1", "train.max_steps_per_epoch=1", f"out={tmp_path / 'run'}", "distill.losses=[ce,dkd]"])
    assert rc == 0
    model, ckpt = load_checkpoint(tmp_path / "run" / "student.pt")
    assert ckpt["arch"]["width"] == 0.125 and ckpt["extra"]["distill"]["losses"] == ["ce", "dkd"]
    rc = main(["distill", str(tmp_path / "t.pt"), "distill.losses=[fitnet]", "distill.pairs=[[features,feat]]",
               "data.n_per_class=6", f"out={tmp_path / 'run2'}"])
    assert rc == 2 and "nearby names" in capsys.readouterr().err
