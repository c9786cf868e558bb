"""Statistics of teacher-vs-student comparisons, checked against values computed by hand."""
from types import SimpleNamespace

import numpy as np
import pytest

from edgeus import stats
from edgeus.pipeline import gates as G

CLASSES = ["benign", "malignant", "normal"]


def _onehot(pred, k=3, p=0.9):
    out = np.full((len(pred), k), (1 - p) / (k - 1))
    out[np.arange(len(pred)), pred] = p
    return out


def test_mcnemar_exact_matches_the_binomial_by_hand():
    # b = 5 teacher-only right, c = 1 student-only right: p = 2 * P[X <= 1], X ~ Bin(6, 1/2) = 2 * 7/64
    ct = np.array([1] * 5 + [0] * 1 + [1] * 10, bool)
    cs = np.array([0] * 5 + [1] * 1 + [1] * 10, bool)
    r = stats.mcnemar_exact(ct, cs)
    assert (r["teacher_only_right"], r["student_only_right"], r["discordant"]) == (5, 1, 6)
    assert r["p_value"] == pytest.approx(14 / 64)
    # no disagreement at all: p = 1; a 3-0 split: 2 * 1/8
    assert stats.mcnemar_exact(ct, ct)["p_value"] == 1.0
    assert stats.mcnemar_exact([1, 1, 1], [0, 0, 0])["p_value"] == pytest.approx(0.25)


def test_flips_count_each_direction_per_true_class():
    y = np.array([0, 0, 1, 1, 1, 2])
    t = np.array([0, 1, 1, 1, 0, 2])     # teacher: right on 0,2,3,5
    s = np.array([0, 0, 0, 1, 0, 1])     # student: right on 0,1,3
    f = stats.flips(y, t, s, CLASSES)
    assert f["benign"] == {"lost": 0, "gained": 1, "n": 2}
    assert f["malignant"] == {"lost": 1, "gained": 0, "n": 3}
    assert f["normal"] == {"lost": 1, "gained": 0, "n": 1}


def test_paired_bootstrap_point_estimates_and_interval_bracket():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    t = np.where(rng.random(200) < 0.9, y, (y + 1) % 3)
    s = np.where(rng.random(200) < 0.8, y, (y + 2) % 3)
    r = stats.paired_bootstrap(y, _onehot(t), _onehot(s), CLASSES, n_boot=1000, seed=0)
    acc = r["accuracy"]
    assert acc["teacher"] == pytest.approx((t == y).mean()) and acc["student"] == pytest.approx((s == y).mean())
    assert acc["lo"] <= acc["diff"] <= acc["hi"]
    # the paired interval's width is close to the normal approximation of a paired difference
    d = (s == y).astype(float) - (t == y).astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert (acc["hi"] - acc["lo"]) / 2 == pytest.approx(half, rel=0.2)
    for c in CLASSES:
        rc = r[f"recall/{c}"]
        assert rc["lo"] <= rc["diff"] <= rc["hi"]


def test_identical_models_have_a_zero_width_interval():
    y = np.array([0, 1, 2, 0, 1, 2])
    p = _onehot(np.array([0, 1, 2, 1, 1, 2]))
    r = stats.paired_bootstrap(y, p, p, CLASSES, n_boot=200)
    assert r["accuracy"]["lo"] == r["accuracy"]["hi"] == 0.0


def test_images_needed_by_hand():
    # discordance 0.1, margin 0.02: (1.96 / 0.02)^2 * 0.1 = 960.4 -> 961
    assert stats.images_needed(0.1, 0.02, 122) == 961
    # no disagreement seen in 120 images: one in 120 assumed -> (1.96/0.01)^2 / 120 = 320.1 -> 321
    assert stats.images_needed(0.0, 0.01, 120) == 321


def _gates(mode, **kw):
    return SimpleNamespace(mode=mode, max_accuracy_drop=kw.get("acc", 0.01), max_recall_drop=kw.get("rec", 0.02),
                           max_ece_rise=kw.get("ece", 0.05), critical_class=kw.get("critical", "malignant"))


def _metrics(y, prob):
    from edgeus.evaluate import compute_metrics

    return compute_metrics(y, prob, CLASSES)


def test_noninferiority_gate_reports_underpowered_on_a_small_split():
    # 122 images, the student loses one image: the point drop is 0.8 pt (passes a 1-pt point gate),
    # but 122 images cannot show non-inferiority at 1 point
    y = np.array([0] * 68 + [1] * 33 + [2] * 21)
    t = y.copy()
    s = y.copy()
    s[0] = 2
    pt, ps = _onehot(t), _onehot(s)
    cmp = stats.compare(y, pt, ps, CLASSES, n_boot=500)
    point = G.check("prune", _metrics(y, pt), _metrics(y, ps), _gates("point"), CLASSES, cmp)
    assert point[0]["metric"] == "accuracy" and point[0]["status"] == "pass"
    ni = G.check("prune", _metrics(y, pt), _metrics(y, ps), _gates("noninferiority"), CLASSES, cmp)
    acc = ni[0]
    assert acc["status"] == "underpowered" and not acc["passed"]
    assert "n = 122" in acc["note"] and acc["needed"] > 122
    assert "underpowered" in G.describe(acc)
    assert acc in G.underpowered(ni) and acc not in G.failures(ni)
    assert ni[1]["metric"] == "recall (malignant)"     # the critical class first


def test_noninferiority_gate_fails_a_clear_loss_and_passes_a_large_clean_split():
    y = np.repeat([0, 1, 2], 400)
    t = y.copy()
    bad = y.copy()
    bad[400:480] = 0                      # 80 of 400 malignant images lost: a real loss
    cmp = stats.compare(y, _onehot(t), _onehot(bad), CLASSES, n_boot=500)
    res = G.check("quantize", _metrics(y, _onehot(t)), _metrics(y, _onehot(bad)), _gates("noninferiority"), CLASSES, cmp)
    assert next(r for r in res if r["metric"] == "recall (malignant)")["status"] == "fail"
    same = stats.compare(y, _onehot(t), _onehot(t), CLASSES, n_boot=200)
    res = G.check("quantize", _metrics(y, _onehot(t)), _metrics(y, _onehot(t)), _gates("noninferiority"), CLASSES, same)
    assert all(r["status"] == "pass" for r in res)


def test_a_class_without_test_images_fails_its_gate_and_an_unknown_critical_class_is_an_error():
    y = np.array([0, 0, 2, 2])
    p = _onehot(y)
    res = G.check("prune", _metrics(y, p), _metrics(y, p), _gates("point"), CLASSES)
    mal = next(r for r in res if r["metric"] == "recall (malignant)")
    assert mal["status"] == "fail" and "no test images" in mal["note"]
    from edgeus.errors import EdgeusError

    with pytest.raises(EdgeusError, match="critical_class"):
        G.check("prune", _metrics(y, p), _metrics(y, p), _gates("point", critical="malignnat"), CLASSES)


def test_bootstrap_metrics_of_one_model_against_hand_computed_values():
    from edgeus.stats import bootstrap_metrics

    y = np.array([0, 0, 1, 1])
    prob = np.eye(2)[[0, 1, 1, 1]]                    # one class-0 image called 1
    m = bootstrap_metrics(y, prob, ["a", "b"], n_boot=500)
    assert m["accuracy"]["value"] == 0.75
    assert abs(m["macro_f1"]["value"] - (2 / 3 + 4 / 5) / 2) < 1e-12   # F1 a = 2/3, F1 b = 4/5
    assert m["recall/a"]["value"] == 0.5 and m["recall/b"]["value"] == 1.0
    for k in ("accuracy", "macro_f1", "recall/a"):
        assert 0 <= m[k]["lo"] <= m[k]["value"] <= m[k]["hi"] <= 1
    assert m["recall/b"]["lo"] == m["recall/b"]["hi"] == 1.0          # never wrong on b: no spread
    perfect = bootstrap_metrics(y, np.eye(2)[y], ["a", "b"])
    assert perfect["accuracy"] == {"value": 1.0, "lo": 1.0, "hi": 1.0}
