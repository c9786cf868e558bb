"""The run report tells one true story: summary first, numbers that match the ledger and the bench
stage, every gate and tolerance miss visible, one sign convention, readable figures, ledger.csv."""
import csv
import json
import re
import shutil

import numpy as np
import pytest

from conftest import make_cfg

RUN_ARGS = ("recipe=rsmas_int8", "model.name=simple_cnn", "prune.finetune_epochs=1", "decompose.finetune_epochs=1",
            "quantize.qat=false", "compress.latency_iters=2", "bench.iters=5", "bench.warmup=1",
            "robustness.strengths=[0.5,1.0]", "gates.enforce=false")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from edgeus.pipeline.runner import compress

    out = tmp_path_factory.mktemp("report") / "run"
    compress(make_cfg(*RUN_ARGS, f"out={out}"))
    return out


@pytest.fixture
def copy(run, tmp_path):
    """A private copy of the run to edit (the report reads relative paths)."""
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _sections(md: str) -> list[str]:
    return re.findall(r"^## (.+)$", md, re.M)


def test_report_story_and_numbers(run):
    from edgeus.pipeline.report import bench_rows

    md = (run / "report.md").read_text()
    ledger = json.loads((run / "ledger.json").read_text())
    secs = _sections(md)
    assert secs[0] == "Summary"
    for s in ("Teacher vs student on the test split", "Timing", "Ledger", "Gates and tolerances", "Robustness"):
        assert s in secs
    summary = md.split("## ")[1]
    # what, where, versions, date
    for word in ("**What**", "**Target**", "**Machine**", "ISA", "**Versions**", "torch", "onnxruntime", "**Date**"):
        assert word in summary, word
    # the summary's accuracies are the ledger's (teacher row, deployed student row)
    rows = [r for r in ledger["rows"] if r.get("metrics")]
    teacher = next(r for r in rows if r["stage"] == "teacher")
    student = [r for r in rows if not r.get("of")][-1]
    assert student["stage"] == "quantize"
    acc_line = next(ln for ln in summary.splitlines() if ln.startswith("| test accuracy"))
    assert f"| {teacher['metrics']['accuracy']:.3f} | {student['metrics']['accuracy']:.3f} |" in acc_line
    diff = (student["metrics"]["accuracy"] - teacher["metrics"]["accuracy"]) * 100
    assert f"{round(diff, 1) + 0.0:+.1f} pt [" in acc_line                 # student − teacher, with an interval
    assert "student − teacher" in summary and "in test images" in summary
    # the latency in the summary and the timing table is the bench stage's one block
    bench = json.loads(next(run.glob("*-bench/bench.json")).read_text())
    b = bench_rows(bench)
    timing = md.split("## Timing")[1].split("## ")[0]
    for r in b:
        assert f"| {r['p50_ms']:.3f} |" in timing
        assert f"{r['speedup']:.2f}×" in timing
    assert "own re-timing of the teacher" in timing          # the ledger's per-row speed-ups, labelled honestly
    lat_line = next(ln for ln in summary.splitlines() if ln.startswith("| latency"))
    assert f"{b[0]['p50_ms']:.3f} ms" in lat_line and "bench block" in lat_line
    # every gate is in the gate table with its status
    gate_tab = md.split("## Gates and tolerances")[1].split("## ")[0]
    assert gate_tab.count("\n| ") - 1 == len(ledger["gates"])
    assert "INT8 tolerance" in gate_tab
    # robustness per class, example corruptions
    rob = md.split("## Robustness")[1]
    assert "| corruption |" in rob and "malignant teacher" in rob and "figures/corruptions.png" in rob


def test_ledger_csv_and_figures(run):
    from PIL import Image

    ledger = json.loads((run / "ledger.json").read_text())
    with open(run / "ledger.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == [r["stage"] for r in ledger["rows"]]
    t = next(r for r in rows if r["stage"] == "teacher")
    assert float(t["accuracy"]) == pytest.approx(ledger["rows"][0]["metrics"]["accuracy"])
    assert "recall_malignant" in rows[0]
    md = (run / "report.md").read_text()
    figs = re.findall(r"\]\((figures/[^)]+\.png)\)", md)
    assert {"figures/headline.png", "figures/bench.png", "figures/stages.png", "figures/robustness.png",
            "figures/curves.png"} <= set(figs)                      # ROC and PR curves per class (seed 000)
    for fig in figs:
        w, h = Image.open(run / fig).size
        assert w <= 900, (fig, w)          # drawn for a 900 px page, not shrunk into illegibility
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figs)
    assert "max-width:880px" in html


def test_saliency_and_gallery(run):
    pytest.importorskip("captum")
    md = (run / "report.md").read_text()
    assert "Where the models look (Grad-CAM)" in _sections(md)
    sal = json.loads((run / "saliency.json").read_text())
    assert sal["n_lesion"] > 0
    for name in ("teacher", "student"):
        assert 0.0 <= sal[name]["lesion_fraction"] <= 1.0
        assert 0.0 <= sal[name]["pointing_game"] <= 1.0
    assert "CAM mass inside the lesion" in md
    assert "Images the student gets wrong and the teacher right" in _sections(md)


def test_misses_are_visible(copy):
    """A quantisation tolerance miss, a failed gate, an underpowered gate and INT8 slower than FP32
    all reach the summary's warnings; nothing says 'all passed'."""
    from edgeus.pipeline.report import write_report

    q = next(copy.glob("*-quantize/report.json"))
    rep = json.loads(q.read_text())
    rep["within_tolerance"] = False
    rep["final_check"] = {"ok": False, "accuracy_drop": 0.031, "worst_class": "malignant", "worst_recall_drop": 0.08,
                          "max_accuracy_drop": 0.01, "max_recall_drop": 0.02, "agreement": 0.95, "min_agreement": 0.99,
                          "fidelity_images": 200, "worst_flip_class": "benign", "worst_flip_rate": 0.01,
                          "max_class_flip_rate": 0.02}
    q.write_text(json.dumps(rep))
    led = json.loads((copy / "ledger.json").read_text())
    g = dict(led["gates"][0], status="fail", passed=False, change=-0.07, limit=0.05)
    u = dict(led["gates"][1], status="underpowered", passed=False, note="n = 15, about 400 images needed")
    led["gates"] = [g, u] + led["gates"][2:]
    (copy / "ledger.json").write_text(json.dumps(led))
    b = next(copy.glob("*-bench/bench.json"))
    bench = json.loads(b.read_text())
    lat = next(copy.glob("*-bench/latency.md")).read_text()
    labels = [ln.split("|")[1].strip() for ln in lat.splitlines()[2:]]
    fp32, int8 = labels.index("student fp32"), labels.index("student int8")
    bench["models"][fp32]["batches"]["1"]["p50_ms"] = 1.0
    bench["models"][int8]["batches"]["1"]["p50_ms"] = 2.0
    b.write_text(json.dumps(bench))
    res = write_report(copy)
    md = (copy / "report.md").read_text()
    summary = md.split("## ")[1]
    assert "INT8 outside its tolerance" in summary and "-3.1 pt" in summary and "-8.0 pt" in summary
    assert "agreement with FP32 95.0 % of 200 images" in summary
    assert "flipped" not in summary                          # the flip rate was within its limit
    assert "**Gate failed**" in summary and "-7.0 pt" in summary
    assert "**Gate underpowered**" in summary and "400 images needed" in summary
    assert "INT8 is slower than FP32 on this machine" in summary and "2.000 ms" in summary
    assert "all passed" not in md
    assert "MISSED" in md
    assert len(res["warnings"]) >= 4
    html = (copy / "report.html").read_text()
    assert '<ul class="warn">' in html


def test_stored_predictions_are_used(copy):
    """When the ledger rows carry per-image predictions the report uses them (not a re-run)."""
    from edgeus.pipeline.report import write_report

    led = json.loads((copy / "ledger.json").read_text())
    rows = [r for r in led["rows"] if r.get("metrics")]
    teacher = next(r for r in rows if r["stage"] == "teacher")
    student = [r for r in rows if not r.get("of")][-1]
    n = teacher["metrics"]["n"]
    y = np.arange(n) % 3
    pt = np.eye(3)[y] * 0.9 + 0.1 / 3                 # teacher: always right
    ps = pt.copy()
    ps[:2] = np.eye(3)[(y[:2] + 1) % 3] * 0.9 + 0.1 / 3  # student: wrong on the first two
    teacher["metrics"].update(labels=y.tolist(), probs=pt.tolist())
    student["metrics"].update(labels=y.tolist(), probs=ps.tolist())
    (copy / "ledger.json").write_text(json.dumps(led))
    res = write_report(copy)
    md = (copy / "report.md").read_text()
    assert "stored in the ledger rows" in md
    assert res["comparison"]["mcnemar"]["teacher_only_right"] == 2
    assert "net -2 images for the student" in md


def test_md_to_html_tables_lists_links():
    from edgeus.pipeline.report import _md_to_html

    h = _md_to_html("**Warnings**:\n\n- **Gate failed** — x\n\n| a | b |\n|---|---|\n| 1 | `c` |\n\nsee [`x.csv`](x.csv)")
    assert '<ul class="warn"><li><b>Gate failed</b> — x</li></ul>' in h
    assert "<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td><code>c</code></td></tr></table>" in h
    assert '<a href="x.csv"><code>x.csv</code></a>' in h


def test_robustness_collapse_is_named():
    """A model that calls everything malignant under shadow is named, not hidden behind its accuracy."""
    from edgeus.pipeline.robustness import collapses, fragility

    def pt(s, acc, rec):
        return {"strength": s, "accuracy": acc, "macro_f1": 0.2, "recall": rec}

    ok = {"normal": 0.9, "benign": 0.8, "malignant": 0.9}
    mal = {"normal": 0.0, "benign": 0.05, "malignant": 1.0}
    rob = {"teacher": {"clean": {"accuracy": 0.9, "recall": ok}, "shadow": [pt(0.5, 0.85, ok), pt(1.0, 0.33, mal)]},
           "student": {"clean": {"accuracy": 0.9, "recall": ok}, "shadow": [pt(0.5, 0.33, mal), pt(1.0, 0.33, mal)]}}
    found = collapses(rob)
    assert [(c["model"], c["strength"], c["class"]) for c in found] == [
        ("teacher", 1.0, "malignant"), ("student", 0.5, "malignant"), ("student", 1.0, "malignant")]
    assert fragility(rob, "teacher", "student")["collapses"] == found
