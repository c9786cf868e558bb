"""Issue 16: an ensemble teacher (averaged logits, single-model student) and checkpoint selection
that does not hinge on a small val split alone (agreement with the teacher on all non-test images)."""
import json

import numpy as np
import pytest
import torch

from conftest import make_cfg

from edgeus.errors import EdgeusError
from edgeus.models import create_model
from edgeus.models.ensemble import EnsembleModel, is_ensemble, make_ensemble, student_member
from edgeus.train.checkpoint import load_checkpoint, save_checkpoint
from edgeus.train.trainer import agreement, selection_score


def _pair():
    torch.manual_seed(0)
    a = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
    torch.manual_seed(1)
    b = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
    return make_ensemble([a.eval(), b.eval()]).eval(), a, b


def test_ensemble_averages_its_members_logits():
    ens, a, b = _pair()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ens(x), (a(x) + b(x)) / 2)
    assert ens.edgeus_arch["name"] == "ensemble" and len(ens.edgeus_arch["kwargs"]["members"]) == 2


def test_student_starts_from_one_member_never_the_ensemble():
    ens, a, b = _pair()
    s = student_member(ens, None)
    assert not isinstance(s, EnsembleModel) and s is not ens.members[0]      # a copy: the teacher stays intact
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in s.state_dict().items())
    one = student_member(ens, "1")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in one.state_dict().items())
    with pytest.raises(EdgeusError, match="never the whole ensemble"):
        student_member(ens, "ensemble")
    with pytest.raises(EdgeusError, match="has 2 members"):
        student_member(ens, 5)
    from edgeus.prune import example_input, prune_model

    with pytest.raises(EdgeusError, match="pruning an ensemble"):
        prune_model(ens, make_cfg().prune, example_inputs=example_input(a, 32, 1))


def test_ensemble_checkpoint_reloads_bit_identically_with_weights_only(tmp_path, small_bundle):
    ens, _, _ = _pair()
    path = save_checkpoint(tmp_path / "ens.pt", ens, classes=small_bundle.classes,
                           preprocessing=small_bundle.preprocessing)
    raw = torch.load(path, weights_only=True)              # plain data, no pickled modules
    assert raw["arch"]["name"] == "ensemble" and raw["arch"]["kwargs"]["members"][1]["name"] == "simple_cnn"
    loaded, _ = load_checkpoint(path)
    assert is_ensemble(loaded) and isinstance(loaded, EnsembleModel)
    sd0, sd1 = ens.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(ens(x), loaded(x))


def test_ensemble_of_two_trains_and_exports_with_onnx_parity(tmp_path, small_bundle):
    from edgeus.onnx.export import export_onnx
    from edgeus.onnx.session import run_logits
    from edgeus.train.ensemble import train_ensemble

    cfg = make_cfg("teacher.ensemble=2", "train.epochs=1")
    ens, report = train_ensemble(cfg.teacher, cfg.model, cfg.data, cfg.train, seed=0, out_dir=tmp_path / "t",
                                 bundle=small_bundle)
    assert isinstance(ens, EnsembleModel) and len(ens.members) == 2
    assert [m["seed"] for m in report["members"]] == [0, 1] and "accuracy" in report["val"]
    assert (tmp_path / "t" / "member-0" / "best.pt").is_file() and (tmp_path / "t" / "member-1" / "best.pt").is_file()
    # member 0 is the single teacher of the same seed
    single, _ = load_checkpoint(tmp_path / "t" / "member-0" / "best.pt")
    assert all(torch.equal(v, single.state_dict()[k]) for k, v in ens.members[0].state_dict().items())
    rep = export_onnx(ens, tmp_path / "ens.onnx", cfg.export, preprocessing=dict(small_bundle.preprocessing),
                      classes=list(small_bundle.classes))
    x = torch.stack([small_bundle.val[i]["image"] for i in range(4)])
    with torch.no_grad():
        np.testing.assert_allclose(run_logits(tmp_path / "ens.onnx", x.numpy()), ens(x).numpy(), atol=1e-4)
    assert rep


def test_agreement_is_per_teacher_class_and_balanced():
    t = np.array([0, 0, 0, 0, 1, 1, 2])
    s = np.array([0, 0, 0, 1, 1, 0, 0])
    a = agreement(t, s, ["n", "b", "m"])
    assert a["per_class"] == {"n": 0.75, "b": 0.5, "m": 0.0}
    assert a["balanced"] == pytest.approx((0.75 + 0.5 + 0.0) / 3) and a["overall"] == pytest.approx(4 / 7)
    assert agreement(np.array([0, 0]), np.array([0, 1]), ["n", "b"])["per_class"]["b"] is None
    val = {"accuracy": 0.8, "macro_f1": 0.6}
    assert selection_score("val", val, a, "macro_f1") == 0.6
    assert selection_score("agreement", val, a, "macro_f1") == pytest.approx(a["balanced"])
    assert selection_score("val+agreement", val, a, "macro_f1") == pytest.approx((0.6 + a["balanced"]) / 2)
    assert selection_score("agreement", val, None, "macro_f1") == 0.6       # no teacher: val picks
    with pytest.raises(ValueError, match="train.select"):
        selection_score("vote", val, a, "macro_f1")


def test_finetuning_records_agreement_and_selects_by_it(small_bundle):
    from edgeus.finetune import make_finetuner

    torch.manual_seed(0)
    teacher = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25).eval()
    out = {}
    for select in ("val", "agreement"):
        torch.manual_seed(1)
        student = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
        ft = make_finetuner(make_cfg(f"train.select={select}"), small_bundle, teacher=teacher)
        model, rep = ft(student, epochs=3)
        out[select] = rep
        assert rep["select"] == select and len(rep["history"]) == 3
        for row in rep["history"]:
            agr = row["agreement"]
            assert agr["n"] == len(small_bundle.train_plain) + len(small_bundle.val)
            assert set(agr["per_class"]) == set(small_bundle.classes) and row["select"]["by"] == select
        assert rep["best_agreement"] == rep["history"][rep["best_epoch"] - 1]["agreement"]
    # the same training either way (selection never changes the trajectory, nor does recording agreement)
    for r1, r2 in zip(out["val"]["history"], out["agreement"]["history"]):
        assert r1["loss"] == r2["loss"] and r1["agreement"] == r2["agreement"]
    hist = out["agreement"]["history"]
    best = max(range(3), key=lambda i: (hist[i]["agreement"]["balanced"], -i))
    assert out["agreement"]["best_epoch"] == best + 1
    # without a teacher: val picks, no agreement recorded
    torch.manual_seed(1)
    _, rep = make_finetuner(make_cfg("train.select=agreement"), small_bundle)(
        create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25), epochs=1)
    assert rep["select"] == "val" and "agreement" not in rep["history"][0]


def test_recording_agreement_leaves_training_unchanged(small_bundle):
    """A teacher only for agreement (use_teacher=False) trains exactly as no teacher at all."""
    from edgeus.finetune import make_finetuner

    torch.manual_seed(0)
    teacher = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25).eval()
    states = []
    for t in (None, teacher):
        torch.manual_seed(1)
        student = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
        model, _ = make_finetuner(make_cfg("train.select=val"), small_bundle, teacher=t)(student, epochs=2,
                                                                                        use_teacher=False)
        states.append(model.state_dict())
        states.append(torch.random.get_rng_state())
    assert all(torch.equal(states[0][k], states[2][k]) for k in states[0])
    assert torch.equal(states[1], states[3])


@pytest.mark.slow
def test_compress_with_an_ensemble_teacher(tmp_path):
    from edgeus.pipeline import compress

    cfg = make_cfg("recipe=rsmas_int8", "model.name=simple_cnn", "teacher.ensemble=2", "prune.finetune_epochs=1",
                   "decompose.finetune_epochs=1", "quantize.qat=false", "compress.latency_iters=3",
                   "gates.enforce=false", "compress.robustness=false", "compress.report=false",
                   f"out={tmp_path / 'run'}", "seed=0")
    result = compress(cfg)
    run = tmp_path / "run"
    teacher, _ = load_checkpoint(next(run.glob("*teacher/model.pt")))
    assert isinstance(teacher, EnsembleModel) and len(teacher.members) == 2
    rep = json.loads(next(run.glob("*teacher/report.json")).read_text())
    assert rep["ensemble"] == 2 and len(rep["members"]) == 2
    pruned, _ = load_checkpoint(next(run.glob("*prune/model.pt")))
    assert not is_ensemble(pruned)
    assert result["ledger"]


def test_prune_report_carries_both_signals_per_epoch(small_bundle):
    from edgeus.finetune import make_finetuner
    from edgeus.prune import example_input, prune_model

    torch.manual_seed(0)
    teacher = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.5).eval()
    cfg = make_cfg("model.width=0.5", "prune.target_macs=0.5", "prune.finetune_epochs=2",
                   "train.select=val+agreement")
    ft = make_finetuner(cfg, small_bundle, teacher=teacher)
    _, rep = prune_model(teacher, cfg.prune, finetune=ft, loaders=ft.loaders,
                         example_inputs=example_input(teacher, 32, 1))
    fin = rep["structured"]["finetune"]
    assert fin["select"] == "val+agreement" and [s["epoch"] for s in fin["signals"]] == [1, 2]
    assert all(0.0 <= s["agreement"] <= 1.0 and s["val"] is not None for s in fin["signals"])
    assert set(fin["signals"][0]["agreement_per_class"]) == set(small_bundle.classes)
    json.dumps(rep)                                  # the stage's report.json


def test_selection_default_is_val_plus_agreement():
    # chosen by bench/select_agreement.py (see the comment at train.select in edgeus/config.py)
    assert make_cfg().train.select == "val+agreement"


def test_bad_selection_or_ensemble_settings_are_refused_up_front():
    from edgeus.config import ConfigError, validate
    from edgeus.errors import UsageError
    from edgeus.train.ensemble import ensemble_members

    with pytest.raises(ConfigError, match="train.select=vote"):
        validate(make_cfg("train.select=vote"))
    with pytest.raises(ConfigError, match="teacher.ensemble=0"):
        validate(make_cfg("teacher.ensemble=0"))
    assert ensemble_members(make_cfg("teacher.ensemble=3").teacher, "rsmas") == ["rsmas"] * 3
    assert ensemble_members(make_cfg("teacher.members=[rsmas,resnet50]").teacher, "rsmas") == ["rsmas", "resnet50"]
    with pytest.raises(UsageError, match="teacher.members lists 2"):
        ensemble_members(make_cfg("teacher.ensemble=3", "teacher.members=[rsmas,resnet50]").teacher, "rsmas")


def test_feature_distillation_from_an_ensemble_needs_named_member_modules():
    from edgeus.distill import build_distiller

    ens, _, _ = _pair()
    student = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
    build_distiller(student, ens, make_cfg("distill.losses=[ce,kd]").distill)        # logits: fine
    with pytest.raises(EdgeusError, match="no single feature map"):
        build_distiller(student, ens, make_cfg("distill.losses=[ce,fitnet]").distill)
    name = [n for n, m in ens.members[0].named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    s_name = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Conv2d)][-1]
    d = build_distiller(student, ens, make_cfg("distill.losses=[ce,fitnet]",
                                               f"distill.pairs=[[members.0.{name},{s_name}]]").distill)
    d.close()
