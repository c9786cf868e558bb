"""edgeus predict / edgeus.explain: the model's own preprocessing and classes, every model kind,
Grad-CAM (captum) teacher and student side by side, saliency inside the lesion."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import phantom_pngs, small_run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny compress run (every stage, phantom) with a bundle, shared by this file's tests."""
    return small_run(tmp_path_factory.mktemp("predict") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Phantom scans as PNG files with BUSI-style masks beside those with a lesion."""
    return phantom_pngs(tmp_path_factory.mktemp("imgs"), 1, 11, "{cls}_{i}")


def test_lesion_scores():
    from edgeus.explain import lesion_fraction, pointing_game

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    cam = np.zeros((8, 8), np.float32)
    cam[3, 3] = 1.0
    cam[7, 7] = 1.0
    assert lesion_fraction(cam, mask) == pytest.approx(0.5)
    assert pointing_game(cam, mask) == 1.0         # argmax picks the first maximum, (3, 3)
    assert lesion_fraction(np.ones((8, 8)), mask) == pytest.approx(mask.mean())   # uniform = area fraction
    assert lesion_fraction(cam, np.zeros((8, 8), bool)) is None                 # no lesion: no score
    assert pointing_game(np.zeros((8, 8)), mask) is None


def test_gradcam_finds_the_discriminative_region():
    """A model whose features live in one quadrant only: its Grad-CAM lies in that quadrant."""
    pytest.importorskip("captum")
    from edgeus.explain import cam_layer, gradcam, lesion_fraction, pointing_game

    class QuadrantConv(torch.nn.Conv2d):
        def forward(self, x):
            quad = torch.zeros(x.shape[-2:])
            quad[:16, :16] = 1.0
            return super().forward(x) * quad

    class Quadrant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = QuadrantConv(1, 2, 3, padding=1, bias=False)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.weight[:, 0, 1, 1] = 1.0
            self.fc = torch.nn.Linear(2, 2)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    m = Quadrant().eval()
    x = torch.rand(2, 1, 32, 32)
    name, layer = cam_layer(m, {"image_size": 32, "in_chans": 1})
    assert name == "conv"
    cam = gradcam(m, x, target=[0, 0], layer=layer)
    assert cam.shape == (2, 32, 32) and cam.max() == pytest.approx(1.0)
    mask = np.zeros((32, 32), bool)
    mask[:16, :16] = True
    assert lesion_fraction(cam[0], mask) > 0.9
    assert pointing_game(cam[0], mask) == 1.0


def test_predict_every_model_kind(tiny_run, images):
    """Bundle, run directory, ONNX and checkpoint: the same classes, probabilities that sum to 1,
    the model's own preprocessing (32 px here, the images are 64 px)."""
    from edgeus.commands.predict import predict

    kinds = {"bundle": tiny_run / "07-package" / "bundle", "run": tiny_run,
             "onnx": tiny_run / "03-export" / "student.fp32.onnx", "ckpt": tiny_run / "02-decompose" / "model.pt"}
    res = {k: predict(p, [images]) for k, p in kinds.items()}
    for k, r in res.items():
        assert r["classes"] == ["normal", "benign", "malignant"], k
        assert r["preprocessing"]["image_size"] == 32, k
        assert len(r["images"]) == 3, k                       # the masks are not images
        for e in r["images"]:
            assert sum(e["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert e["class"] == max(e["probabilities"], key=e["probabilities"].get)
    # the fp32 ONNX and the checkpoint it was exported from agree
    for a, b in zip(res["onnx"]["images"], res["ckpt"]["images"]):
        for c in a["probabilities"]:
            assert a["probabilities"][c] == pytest.approx(b["probabilities"][c], abs=1e-4)
    assert res["bundle"]["model"].endswith("model.int8.onnx")   # the bundle's runtime order: INT8 first


def test_predict_cli_json_and_cam(tiny_run, images, tmp_path, capsys):
    pytest.importorskip("captum")
    from edgeus.cli import main

    cams = tmp_path / "cams"
    assert main(["predict", str(tiny_run / "07-package" / "bundle"), str(images), "--json", "--cam", str(cams)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["cam_models"]) == {"teacher", "student"}
    assert out["cam_models"]["teacher"].endswith(os.path.join("00-teacher", "model.pt"))
    assert out["cam_models"]["student"].endswith(os.path.join("02-decompose", "model.pt"))
    for e in out["images"]:
        assert os.path.isfile(e["cam"]["file"])
        models = e["cam"]["models"]
        assert set(models) == {"teacher", "student"}
        lesion = not e["path"].endswith("normal_0.png")
        for d in models.values():
            assert d["class"] in out["classes"]
            if lesion:       # masks beside benign and malignant scans: a score in [0, 1]
                assert 0.0 <= d["lesion_fraction"] <= 1.0 and d["pointing_game"] in (0.0, 1.0)
            else:
                assert "lesion_fraction" not in d
    assert main(["predict", str(tiny_run / "00-teacher" / "model.pt"), str(images)]) == 0
    text = capsys.readouterr().out
    assert "normal_0.png" in text and "malignant" in text


def test_predict_errors(tiny_run, images, tmp_path, capsys):
    from edgeus.cli import main

    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    code = main(["predict", str(engine), str(images)])
    err = capsys.readouterr().err
    assert code != 0 and "tensorrt" in err.lower()
    assert main(["predict", str(tmp_path / "missing.onnx"), str(images)]) != 0
    assert "no such model" in capsys.readouterr().err
    assert main(["predict", str(tiny_run / "07-package" / "bundle")]) != 0
    assert "usage" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert main(["predict", str(tiny_run / "07-package" / "bundle"), str(bad)]) != 0
    assert "not a readable image" in capsys.readouterr().err
    lone = tmp_path / "lone"
    lone.mkdir()
    import shutil

    shutil.copy(tiny_run / "03-export" / "student.fp32.onnx", lone / "m.onnx")
    assert main(["predict", str(lone / "m.onnx"), str(images), "--cam", str(tmp_path / "c")]) != 0
    assert "no torch model" in capsys.readouterr().err


def test_threads_plan_on_a_busy_machine():
    """The shared-machine thread plan (edgeus.threads): passive waiting and fewer threads when others
    load the cores; a user's own settings are never overwritten; nothing changes on a quiet big box."""
    from edgeus.threads import plan

    p = plan(cores=2, load=3.0, environ={})
    assert p.oversubscribed and p.env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
                                          "MKL_NUM_THREADS": "1"}
    p = plan(cores=2, load=1.0, environ={})            # one competing job on two cores: one thread, passive
    assert p.oversubscribed and p.env["OMP_NUM_THREADS"] == "1" and p.env["OMP_WAIT_POLICY"] == "PASSIVE"
    p = plan(cores=8, load=5.5, environ={})
    assert p.oversubscribed and p.threads == 3 and p.env["OMP_NUM_THREADS"] == "3"
    p = plan(cores=8, load=12.0, environ={})
    assert p.oversubscribed and p.env["OMP_NUM_THREADS"] == "1"
    p = plan(cores=16, load=20.0, environ={"OMP_NUM_THREADS": "4"})
    assert "OMP_NUM_THREADS" not in p.env and p.threads == 4 and p.env["OMP_WAIT_POLICY"] == "PASSIVE"
    p = plan(cores=32, load=0.3, environ={})
    assert not p.oversubscribed and p.env == {} and p.threads == 32      # a quiet big machine: untouched
    assert plan(cores=2, load=0.2, environ={}).env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {"EDGEUS_THREADS": "off"}
    from edgeus.threads import configure

    configure(environ=env, cores=2, load=9.0)
    assert env == {"EDGEUS_THREADS": "off"}
    env = {}
    assert configure(environ=env, cores=2, load=9.0).threads == 1 and env["OMP_NUM_THREADS"] == "1"
    import subprocess
    import sys

    code = ("import sys, edgeus.threads as t; t.configure(); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_view_without_pyside6_says_how_to_install(tiny_run, monkeypatch, capsys):
    """`edgeus view` without the [app] extra: exit 6 (optional dependency missing) and the pip line."""
    import sys

    from edgeus.cli import main

    monkeypatch.setitem(sys.modules, "PySide6", None)      # import PySide6 -> ImportError
    assert main(["view", str(tiny_run)]) == 6
    assert "pip install 'edgeus[app]'" in capsys.readouterr().err


def test_help_of_predict_and_view(capsys):
    from edgeus.cli import main

    assert main(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--cam" in out and "--json" in out
    assert main(["view", "--help"]) == 0
    assert "[app]" in capsys.readouterr().out
