"""edgeus view: the Qt viewer driven headless (QT_QPA_PLATFORM=offscreen).

Skipped only when PySide6 (the optional [app] extra) is not installed."""
import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6", reason="PySide6 not installed: the viewer is the optional [app] extra "
                                      "(pip install 'edgeus[app]')")

from conftest import phantom_pngs, small_run  # noqa: E402

pytestmark = pytest.mark.slow      # a compress run and a Qt window: end to end


@pytest.fixture(scope="module")
def qapp():
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny compress run (every stage, phantom) with a bundle, shared by this file's tests."""
    return small_run(tmp_path_factory.mktemp("viewer") / "run")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Phantom scans as PNG files with BUSI-style masks beside those with a lesion."""
    return phantom_pngs(tmp_path_factory.mktemp("imgs"), 2, 3, "{i:02d}_{cls}")


def _expected(run, images):
    """What teacher and deployed student predict, computed without the viewer."""
    from edgeus.commands.predict import predict

    t = predict(run / "00-teacher" / "model.pt", [images])
    s = predict(run, [images])
    return t, s


def test_viewer_shows_predictions_and_flags_disagreements(qapp, tiny_run, images, tmp_path):
    from edgeus.app.viewer import ViewerWindow

    t, s = _expected(tiny_run, images)
    w = ViewerWindow(tiny_run)
    w.resize(1250, 640)
    w.show()
    assert w.shown()["items"] == []
    w.open_paths([images])
    qapp.processEvents()
    shown = w.shown()
    assert len(shown["items"]) == 6                                  # the masks are not listed
    assert set(shown["panels"]) == {"teacher", "student"}
    assert shown["panels"]["student"]["title"].endswith("student.int8.onnx)")
    expected_flags = [i for i, (a, b) in enumerate(zip(t["images"], s["images"])) if a["class"] != b["class"]]
    assert shown["flagged"] == expected_flags
    for i in range(6):
        assert shown["items"][i].startswith("⚠ ") == (i in expected_flags)

    # force a disagreement: the flag and the banner must say so
    e = w.entries[0]
    k = int(np.argmax(e.probs["teacher"]))
    e.probs["student"] = np.roll(np.eye(len(w.classes))[k], 1).astype(np.float32)
    w.show_entry(0)
    assert w.shown()["banner"].startswith("⚠ DISAGREEMENT")

    for row in range(6):
        w.list.setCurrentRow(row)
        qapp.processEvents()
        shown = w.shown()
        assert shown["row"] == row
        for name, res in (("teacher", t["images"][row]), ("student", s["images"][row])):
            p = shown["panels"][name]
            assert p["has_image"]
            assert p["verdict"].startswith(res["class"]) or row == 0
            if row:
                for c, v in res["probabilities"].items():
                    assert p["bars"][c] == pytest.approx(v, abs=1e-3)
            lesion = "normal" not in w.entries[row].path.name
            if importlib_captum():
                assert ("Grad-CAM inside the lesion" in p["note"]) == lesion
        if row and not w.entries[row].disagree:
            assert "DISAGREEMENT" not in shown["banner"]
    out = tmp_path / "viewer.png"
    assert w.grab().save(str(out))
    assert out.stat().st_size > 10_000
    w.close()


def importlib_captum():
    import importlib.util

    return importlib.util.find_spec("captum") is not None


def test_viewer_opens_a_bundle(qapp, tiny_run, images):
    """A bundle inside its run: the teacher is found; the student is the bundle's INT8 model."""
    from edgeus.app.viewer import ViewerWindow

    w = ViewerWindow(tiny_run / "07-package" / "bundle", [images])
    shown = w.shown()
    assert set(shown["panels"]) == {"teacher", "student"}
    assert "model.int8.onnx" in shown["panels"]["student"]["title"]
    w.close()


def test_view_command_usage_errors(capsys):
    from edgeus.cli import main

    assert main(["view"]) == 2
    assert "usage" in capsys.readouterr().err
