import numpy as np
import pytest

from edgeus.evaluate import compute_metrics, expected_calibration_error


def test_metrics_against_hand_computed_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1], [.1, .2, .7], [.5, .1, .4]])
    m = compute_metrics(labels, probs, ["a", "b", "c"])
    # predictions 0,1,1,1,2,0 -> confusion [[1,1,0],[0,2,0],[1,0,1]]
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["recall"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5})
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    f1 = [2 * .5 * .5 / 1, 2 * (2 / 3) / (2 / 3 + 1), 2 * 1 * .5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # AUC of class a: positives scores .8,.3 vs negatives .2,.1,.1,.5 -> pairs won 4+3 of 8
    assert m["auc_per_class"]["a"] == pytest.approx(7 / 8)


def test_auc_ties_count_half():
    m = compute_metrics(np.array([0, 1]), np.array([[.5, .5], [.5, .5]]), ["x", "y"])
    assert m["auc"] == pytest.approx(0.5)


def test_ece_hand_computed():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[.9, .1], [.9, .1], [.6, .4], [.4, .6]])
    # bin (0.8667,0.9333]: conf .9 acc 1 -> |1-.9|*2/4 = .05 ; bin (.5333,.6]: conf .6 acc .5 -> .1*2/4 = .05
    assert expected_calibration_error(labels, probs, bins=15) == pytest.approx(0.1)


def test_perfect_predictions():
    m = compute_metrics(np.array([0, 1, 1]), np.array([[1, 0], [0, 1], [0, 1.]]), ["n", "p"])
    assert m["accuracy"] == 1 and m["macro_f1"] == 1 and m["auc"] == 1 and m["ece"] == pytest.approx(0)


# ---------------------------------------------------------------------------------------------- edgeus eval
import json  # noqa: E402

import torch  # noqa: E402
from conftest import make_cfg  # noqa: E402

PHANTOM = ("data.n_per_class=8",)


def _model_and_bundle(*overrides, classes=None):
    from edgeus.data import build_datasets
    from edgeus.models import create_model

    cfg = make_cfg(*PHANTOM, *overrides)
    if classes:
        cfg.data.classes = list(classes)
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=len(bundle.classes), width=0.25).eval()
    return cfg, bundle, model


def _checkpoint(tmp_path, cfg, bundle, model, name="m.pt"):
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.train.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / name, model, classes=bundle.classes, preprocessing=bundle.preprocessing,
                           data=data_fingerprint(bundle, cfg.data))


def test_data_fingerprint_follows_the_split():
    from edgeus.data import build_datasets
    from edgeus.data.fingerprint import data_fingerprint, verify_split, with_calibration

    cfg, bundle, _ = _model_and_bundle()
    fp = data_fingerprint(bundle, cfg.data)
    assert fp["dataset"] == "phantom" and fp["seed"] == 0 and fp["split"] == [0.6, 0.2, 0.2]
    assert set(fp["sha256"]) == {"train", "val", "test"} and verify_split(bundle, fp) == []
    assert data_fingerprint(bundle, cfg.data) == fp                      # deterministic
    other = build_datasets(make_cfg(*PHANTOM, "data.seed=1").data)
    assert verify_split(other, fp) == ["train", "val", "test"]           # another seed: another split
    cal = with_calibration(fp, bundle.ids("train")[:5])
    assert cal["n"]["calibration"] == 5 and len(cal["sha256"]["calibration"]) == 64 and "calibration" not in fp["n"]


def test_eval_refuses_images_the_model_has_seen(tmp_path, capsys):
    from edgeus.cli import main

    cfg, bundle, model = _model_and_bundle()
    ckpt = _checkpoint(tmp_path, cfg, bundle, model)
    assert main(["eval", str(ckpt)]) == 0                              # its own test split: scored
    out = json.loads((tmp_path / "m.test.metrics.json").read_text())
    leak = out["evaluated"]["leak_check"]
    assert leak["checked"] and leak["overlap"] == 0 and out["n"] == len(bundle.test)
    capsys.readouterr()
    assert main(["eval", str(ckpt), "eval.split=train"]) == 4          # its own train split: refused
    assert "were used to train or validate" in capsys.readouterr().err
    # other split ratios over the same images draw a test split from the model's train/val images: refused
    other = ["eval.split_from=data", "data.split=[0.2,0.2,0.6]", *PHANTOM]
    assert main(["eval", str(ckpt), *other]) == 4
    err = capsys.readouterr().err
    assert "were used to train or validate" in err and "allow_overlap" in err
    assert main(["eval", str(ckpt), *other, "eval.allow_overlap=true"]) == 0
    out = json.loads((tmp_path / "m.test.metrics.json").read_text())
    assert out["evaluated"]["leak_check"]["overlap"] > 0 and out["evaluated"]["leak_check"]["allowed"]


def _folder(root, n=6, size=24):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("benign", "malignant", "normal"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def test_eval_follows_a_moved_dataset_and_refuses_a_changed_one(tmp_path, capsys):
    import shutil

    from edgeus.cli import main

    root = _folder(tmp_path / "data")
    cfg, bundle, model = _model_and_bundle("data=folder", f"data.root={root}")
    ckpt = _checkpoint(tmp_path, cfg, bundle, model)
    moved = tmp_path / "moved"
    shutil.move(str(root), str(moved))
    assert main(["eval", str(ckpt)]) == 4                              # the stored root is gone: data.root= says where
    assert str(root) in capsys.readouterr().err
    assert main(["eval", str(ckpt), f"data.root={moved}"]) == 0        # same files, new place: same split
    assert json.loads((tmp_path / "m.test.metrics.json").read_text())["evaluated"]["leak_check"]["split_verified"]
    (moved / "benign" / "benign_0.png").unlink()                       # the dataset changed
    capsys.readouterr()
    assert main(["eval", str(ckpt), f"data.root={moved}"]) == 4
    assert "cannot be reproduced" in capsys.readouterr().err


def test_eval_by_default_reproduces_the_models_own_split(tmp_path, capsys):
    from edgeus.cli import main

    cfg, bundle, model = _model_and_bundle("data.seed=3")
    ckpt = _checkpoint(tmp_path, cfg, bundle, model)
    assert main(["eval", str(ckpt), "data.seed=0", *PHANTOM]) == 0    # the model's seed 3 wins, with a note
    assert "data.seed=0 ignored" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.test.metrics.json").read_text())["evaluated"]["leak_check"]["overlap"] == 0


@pytest.mark.parametrize("size,classes", [(48, ["normal", "benign", "malignant"]), (112, ["malignant", "benign"])])
def test_eval_of_an_onnx_model_uses_its_stored_size_and_classes(tmp_path, size, classes):
    from edgeus.cli import main
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.onnx.export import export_with_data

    cfg, bundle, model = _model_and_bundle(f"data.image_size={size}", "data.phantom_size=64", classes=classes)
    assert bundle.classes == classes
    path = tmp_path / f"m{size}.onnx"
    export_with_data(model, path, cfg.export, bundle, data=data_fingerprint(bundle, cfg.data))
    # the command line says nothing about size or classes: both come from the file
    assert main(["eval", str(path)]) == 0
    out = json.loads(path.with_suffix(".test.metrics.json").read_text())
    assert out["evaluated"]["preprocessing"]["image_size"] == size and out["classes"] == classes
    assert out["n"] == len(bundle.test) and out["evaluated"]["leak_check"]["overlap"] == 0


def test_eval_without_a_fingerprint_warns(tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.train.checkpoint import save_checkpoint

    cfg, bundle, model = _model_and_bundle()
    ckpt = save_checkpoint(tmp_path / "old.pt", model, classes=bundle.classes, preprocessing=bundle.preprocessing)
    assert main(["eval", str(ckpt), *PHANTOM]) == 0
    assert "carries no data fingerprint" in capsys.readouterr().out


def test_eval_of_an_engine_needs_tensorrt(tmp_path, capsys):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from edgeus.cli import main

    eng = tmp_path / "m.engine"
    eng.write_bytes(b"x")
    assert main(["eval", str(eng)]) == 6
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_eval_run_scores_teacher_and_student_on_the_runs_test_split(tmp_path, capsys):
    from omegaconf import OmegaConf

    from edgeus.cli import main
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.onnx.export import export_with_data

    cfg, bundle, model = _model_and_bundle("data.seed=2")
    run = tmp_path / "run"
    (run / "00-teacher").mkdir(parents=True)
    (run / "03-quantize").mkdir()
    _checkpoint(run / "00-teacher", cfg, bundle, model, name="model.pt")
    export_with_data(model, run / "03-quantize" / "student.int8.onnx", cfg.export, bundle,
                     data=data_fingerprint(bundle, cfg.data))
    (run / "state.json").write_text(json.dumps({"artifacts": {"teacher_model": "00-teacher/model.pt",
                                                              "int8_onnx": "03-quantize/student.int8.onnx"}}))
    OmegaConf.save(cfg, run / "config.yaml")
    assert main(["eval", f"run={run}"]) == 0
    res = json.loads((run / "eval.test.json").read_text())
    assert set(res["models"]) == {"teacher", "student"}
    for m in res["models"].values():
        assert m["n"] == len(bundle.test) and m["evaluated"]["leak_check"]["overlap"] == 0
    assert "student - teacher" in capsys.readouterr().out
