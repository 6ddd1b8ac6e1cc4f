"""Calibration fitting and metrics on synthetic error matrices with a known answer."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.calibration import metrics as m
from cytoedge.calibration.fit import conformal_threshold, fit_calibration, fit_temperature, select_probes
from cytoedge.runtime.calibration_config import AnomalyNormalisation, Thresholds
from cytoedge.runtime.estimator import RaceSettings

CLASSES = ["a", "b", "c", "d"]


def synthetic_errors(rng, n=400, k=4, informative=(2,), noise_probes=4, strength=0.4):
    """Errors where only the ``informative`` probes carry the label (lower error for the true class)."""
    y = rng.integers(0, k, n)
    E = rng.normal(1.0, 0.2, (n, k, noise_probes))
    for p in informative:
        E[np.arange(n), y, p] -= strength
    return np.abs(E), y


def test_probe_selection_finds_the_informative_probe(rng):
    E, y = synthetic_errors(rng)
    chosen, weights = select_probes(E, y, max_probes=3, min_gain=0.002)
    assert chosen[0] == 2 and weights[0] == max(weights)


def test_fitted_calibration_is_complete_and_sane(rng):
    E, y = synthetic_errors(rng, n=600, informative=(1, 2), strength=0.3)
    cal = fit_calibration(E, y, CLASSES, ["d"], {"coverage": 0.9})
    assert len(cal["probe_weights"]) == len(cal["elimination_margins"]) >= 2
    assert set(cal["chosen_candidates"][:2]) == {1, 2}
    assert cal["temperature"] > 0 and 0 < cal["conformal_threshold"] <= 1
    assert 0 <= cal["abstention_threshold"] <= 1 and 0 < cal["abnormal_threshold"] < 1
    assert np.all(np.asarray(cal["elimination_margins"]) >= 0)


def test_null_ratio_anomaly_score_flags_cells_no_class_explains(rng):
    """Known cells: the true class beats the null prediction; 'unseen' cells: no class does, and
    they are *easier* to denoise overall (lower errors everywhere), which fools the plain error."""
    from cytoedge.calibration.fit import offline_race
    from cytoedge.runtime.decisions import anomaly_scores

    E, y = synthetic_errors(rng, n=600, informative=(1, 2), strength=0.3)
    null = E.mean(1) + 0.2
    cal = fit_calibration(np.concatenate([E, null[:, None, :]], axis=1), y, CLASSES, ["d"])
    assert cal["anomaly_normalisation"]["kind"] == "null_ratio"
    unseen = 0.5 * np.abs(rng.normal(1.0, 0.2, (200, 4, 4)))
    unseen_null = unseen.min(1) * 0.98
    chosen = cal["chosen_candidates"]
    settings = RaceSettings(np.asarray(cal["probe_weights"]), np.asarray(cal["elimination_margins"]))
    normalisation = AnomalyNormalisation.from_dict(cal["anomaly_normalisation"])
    scores = {}
    for name, (errs, nulls) in {"known": (E, null), "unseen": (unseen, unseen_null)}.items():
        race = offline_race(errs[:, :, chosen], settings, nulls[:, chosen])
        scores[name] = anomaly_scores(race.leader_errors, race.null_errors, normalisation)
    truth = np.r_[np.zeros(600, bool), np.ones(200, bool)]
    assert m.auroc(np.r_[scores["known"], scores["unseen"]], truth) > 0.95
    assert (scores["unseen"] > cal["anomaly_threshold"]).mean() > 0.8
    with pytest.raises(ValueError, match="recalibrate"):
        anomaly_scores(race.leader_errors, None, normalisation)


def test_temperatures_by_race_depth_recover_each_depths_scale(rng):
    """Gaps drawn at temperature 3 for cells decided after one probe, 1 for deeper races."""
    from cytoedge.calibration.fit import fit_depth_temperatures
    from cytoedge.runtime.decisions import cell_temperatures

    n, k = 3000, 4
    depth = rng.choice([1, 2, 3, 4], n, p=[0.6, 0.2, 0.1, 0.1])
    logits = rng.normal(0, 2.0, (n, k))
    y = np.array([rng.choice(k, p=np.exp(l) / np.exp(l).sum()) for l in logits])
    true_t = np.where(depth == 1, 3.0, 1.0)
    gaps = (logits.max(1, keepdims=True) - logits) * true_t[:, None]
    temps = fit_depth_temperatures(gaps, depth, y, groups=3, min_cells=20, fallback=9.0)
    np.testing.assert_allclose(temps, [3.0, 1.0, 1.0], rtol=0.15)
    assert fit_depth_temperatures(gaps, depth, y, groups=3, min_cells=10**6, fallback=9.0) == [9.0] * 3
    np.testing.assert_array_equal(cell_temperatures(np.array([1, 2, 3, 7]), 9.0, (3.0, 2.0, 1.0)), [3.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(cell_temperatures(np.array([1, 5]), 1.5), [1.5, 1.5])


def test_fit_refuses_data_missing_a_class(rng):
    E, y = synthetic_errors(rng, n=100)
    y[y == 3] = 0
    with pytest.raises(Exception, match=r"no labelled cells of class\(es\) \['d'\]"):
        fit_calibration(E, y, CLASSES, ["d"])


def test_fit_refuses_a_class_too_small_to_split_before_fitting(rng):
    """One cell of a class cannot be both fitted on (A) and checked on (B): refused by name, in one line."""
    from cytoedge.calibration.fit import check_fit_labels, split_ab
    from cytoedge.runtime.errors import CalibrationError

    E, y = synthetic_errors(rng, n=4)
    y = np.arange(4)  # one cell per class
    with pytest.raises(CalibrationError, match=r"at least 2 labelled cells of every class.*a \(1\), b \(1\)") as e:
        fit_calibration(E, y, CLASSES, ["d"])
    assert "\n" not in str(e.value)
    y2 = np.repeat(np.arange(4), 2)  # two per class: one on each side, whatever the fraction
    check_fit_labels(y2, CLASSES, ["d"])
    for fraction in (0.1, 0.6, 0.9):
        a, b = split_ab(y2, fraction, 0)
        assert set(y2[a]) == set(y2[b]) == {0, 1, 2, 3}
    with pytest.raises(CalibrationError, match="split_a_fraction"):
        split_ab(y2, 1.0, 0)
    with pytest.raises(CalibrationError, match="abnormal"):
        check_fit_labels(y2, CLASSES, ["zz"])


def test_temperature_recovers_the_generating_one(rng):
    n, k, t_true = 4000, 4, 2.5
    gaps = rng.exponential(3.0, (n, k))
    p = np.exp(-gaps / t_true)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    assert fit_temperature(gaps, y) == pytest.approx(t_true, rel=0.15)


def test_conformal_sets_reach_their_coverage_on_exchangeable_data(rng):
    n, k = 4000, 5
    logits = rng.normal(0, 2, (n, k))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    q = conformal_threshold(p[:2000], y[:2000], 0.9)
    covered = (1 - p[2000:])[np.arange(2000), y[2000:]] <= q
    assert covered.mean() == pytest.approx(0.9, abs=0.03)


def test_metrics_against_hand_computed_values():
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    assert m.balanced_accuracy(y, pred, 3) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m.confusion_matrix(y, pred, 3).tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert m.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    assert m.brier_score(p, np.array([0, 1])) == pytest.approx((0.01 + 0.01 + 0.36 + 0.36) / 2)
    assert m.expected_calibration_error(np.array([[0.8, 0.2]] * 10), np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)
    assert m.sensitivity_specificity(np.array([1, 0, 1, 0]), np.array([1, 1, 0, 0])) == (0.5, 0.5)


def test_specificity_at_sensitivity_takes_the_highest_threshold_that_reaches_it():
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.75, 0.5, 0.3, 0.1, 0.05, 0.6])
    positive = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    best = m.specificity_at_sensitivity(score, positive, 0.75)  # 3 of 4 positives: threshold 0.7
    assert best["threshold"] == pytest.approx(0.7)
    assert (best["sensitivity"], best["specificity"]) == (0.75, pytest.approx(5 / 6))  # only 0.75 flagged
    full = m.specificity_at_sensitivity(score, positive, 1.0)  # every positive: down to 0.2
    assert full["threshold"] == pytest.approx(0.2) and full["specificity"] == pytest.approx(2 / 6)
    assert m.specificity_at_sensitivity(score, np.zeros(10), 0.95)["threshold"] is None


def _screen_of_six_cells(abstention: float) -> dict:
    """evaluate_arrays on six cells of two normal classes and one abnormal one (sensitivity target 1)."""
    from cytoedge.runtime.commands.evaluate import evaluate_arrays
    from cytoedge.runtime.decisions import decide

    names = ["normal_a", "normal_b", "abn"]
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.9, .05, .05], [.8, .1, .1], [.2, .2, .6], [.5, .1, .4], [.1, .1, .8], [.3, .2, .5]])
    d = decide(p, np.zeros(6), np.array([False, False, True]),
               Thresholds(conformal=0.9, abstention=abstention, anomaly=np.inf, abnormal=0.5))
    return evaluate_arrays(y, p.argmax(1), np.ones(6), 1.0, names, ["abn"], d, abnormal_sensitivity=1.0)


def test_evaluation_names_the_normal_classes_an_abnormal_screen_would_flag():
    out = _screen_of_six_cells(abstention=0.0)
    best = out["abnormal_probability_at_target_sensitivity"]
    assert best["threshold"] == pytest.approx(0.5) and best["specificity"] == pytest.approx(0.75)
    assert best["false_positives_by_class"] == {"normal_a": 0, "normal_b": 1}


def test_review_flag_at_target_sensitivity_counts_uncertain_cells_as_flagged():
    out = _screen_of_six_cells(abstention=0.55)  # rows 3 and 5 (top probability 0.5) are uncertain
    review = out["review_flag_at_target_sensitivity"]
    # The uncertain abnormal cell (P 0.5) is flagged anyway, so the threshold may rise to the other's 0.8;
    # the uncertain normal cell (row 3) is the one false positive, the 0.6 cell no longer is.
    assert review["threshold"] == pytest.approx(0.8) and review["sensitivity"] == 1.0
    assert review["specificity"] == pytest.approx(0.75)
    assert out["abnormal_probability_at_target_sensitivity"]["threshold"] == pytest.approx(0.5)
