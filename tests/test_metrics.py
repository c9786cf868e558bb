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
