"""Class shares corrected for a classifier's confusions (runtime/prior_shift.py), on samples drawn from
a known model: three overlapping Gaussian classes whose exact posteriors under equal priors are the
calibrated probabilities. Counting the argmax carries the overlap into the shares; EM undoes it."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.runtime.prior_shift import _em_step, prior_adjusted_shares, shares_with_interval

MEANS = np.array([0.0, 2.5, 5.0])  # class means on one feature, unit variance: neighbours overlap


@pytest.fixture
def sample(known_posteriors):
    """Labels and exact posteriors of ``n`` cells drawn with class ``shares``."""
    def draw(shares: list[float], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.random.default_rng(seed + 1000).choice(len(MEANS), size=n, p=shares)
        return y, known_posteriors(y, MEANS, seed)
    return draw


def test_corrected_shares_recover_a_skewed_sample_that_counting_gets_wrong(sample):
    truth = np.array([0.9, 0.02, 0.08])
    _, p = sample(truth.tolist(), 20000, seed=1)
    called = np.bincount(p.argmax(1), minlength=3) / len(p)
    assert called[1] > 5 * truth[1]  # a tenth of class 0 is called class 1
    assert np.abs(prior_adjusted_shares(p) - truth).max() < 0.01


def test_a_class_absent_from_the_sample_is_estimated_near_zero(sample):
    _, p = sample([0.7, 0.0, 0.3], 5000, seed=2)
    shares = prior_adjusted_shares(p)
    assert shares[1] < 0.01 and shares.sum() == pytest.approx(1.0)


def test_the_accelerated_answer_is_plain_ems_fixed_point(sample):
    _, p = sample([0.6, 0.1, 0.3], 2000, seed=3)
    plain = p.mean(0)
    for _ in range(20000):
        plain = _em_step(p, plain, np.full(3, 1 / 3))
    assert np.abs(prior_adjusted_shares(p) - plain).max() < 1e-4


def test_a_known_calibration_prior_is_divided_out(sample):
    """Posteriors calibrated under a 1:1:2 prior, re-weighted to equal priors, give the same shares."""
    _, p = sample([0.5, 0.3, 0.2], 5000, seed=4)
    prior = np.array([0.25, 0.25, 0.5])
    skewed = p * prior
    skewed /= skewed.sum(1, keepdims=True)
    assert np.abs(prior_adjusted_shares(skewed, prior) - prior_adjusted_shares(p)).max() < 1e-4


def test_the_bootstrap_interval_is_seeded_and_covers_the_truth(sample):
    truth = np.array([0.8, 0.05, 0.15])
    _, p = sample(truth.tolist(), 1000, seed=5)
    shares, lo, hi = shares_with_interval(p, ([1, 2],), resamples=100)
    again = shares_with_interval(p, ([1, 2],), resamples=100)
    assert np.array_equal(lo, again[1]) and np.array_equal(hi, again[2])
    truth = np.append(truth, truth[1:].sum())
    assert np.all(lo <= truth) and np.all(truth <= hi) and np.all(hi - lo < 0.12)
    assert shares[3] == pytest.approx(shares[1] + shares[2])
    # A group's interval is read off the same draws as its classes': all classes together are 100 % in
    # every draw, an interval of no width (summing the classes' intervals would give a wide one).
    whole, lo_all, hi_all = shares_with_interval(p, ([0, 1, 2],), resamples=100)
    assert whole[3] == pytest.approx(1.0) and hi_all[3] - lo_all[3] < 1e-9


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.ones(3)])
def test_an_empty_or_flat_array_is_refused(bad):
    with pytest.raises(ValueError, match="non-empty"):
        prior_adjusted_shares(bad)


@pytest.mark.parametrize("bad", [np.array([[0.5, np.nan, 0.5]]), np.array([[1.2, -0.2, 0.0]])])
def test_non_finite_or_negative_probabilities_are_refused(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        prior_adjusted_shares(bad)
