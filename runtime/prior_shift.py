"""A sample's class shares corrected for the classifier's confusions: the EM re-estimate of the class
priors of Saerens, Latinne & Decaestecker (Neural Computation 2002;14:21-41).

Counting each cell's predicted class carries the model's confusions into the shares: a slide of
spherocytes or microcytes shows schistocytes that are not there, because a few of those cells are called
schistocytes. The calibrated probabilities say how often that happens, and EM finds the class shares
under which the sample's probabilities are most likely: each cell's posterior is re-weighted by the
current shares over the prior the model was calibrated under, and the shares become the mean posterior,
until they stop moving. Pure over arrays.
"""
from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 1000  # SQUAREM cycles (three EM steps each)
TOLERANCE = 1e-7  # largest change of any share between two iterations at which EM stops


def _em_step(p: np.ndarray, shares: np.ndarray, base: np.ndarray) -> np.ndarray:
    w = p * (shares / base)
    w /= np.maximum(w.sum(1, keepdims=True), 1e-300)
    return w.mean(0)


def prior_adjusted_shares(probabilities: np.ndarray, calibration_prior: np.ndarray | None = None) -> np.ndarray:
    """Class shares ``[K]`` of the sample whose calibrated posteriors are ``probabilities [N, K]``.

    ``calibration_prior``: the class prior the posteriors were calibrated under (default uniform: a
    diffusion classifier compares class-conditional likelihoods with equal weights). Plain EM creeps
    towards a share near zero over thousands of steps; SQUAREM's extrapolation (Varadhan & Roland,
    Scand J Stat 2008;35:335-53) gets there in tens, each extrapolated point mapped back by one EM step.
    """
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"probabilities must be a non-empty [cells, classes] array, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    k = p.shape[1]
    base = np.full(k, 1.0 / k) if calibration_prior is None else np.asarray(calibration_prior, np.float64)
    shares = p.mean(0)
    for _ in range(MAX_ITERATIONS):
        one = _em_step(p, shares, base)
        two = _em_step(p, one, base)
        r, v = one - shares, two - 2 * one + shares
        if np.abs(r).max() < TOLERANCE or not np.any(v):
            return two
        alpha = min(-np.linalg.norm(r) / np.linalg.norm(v), -1.0)
        jump = np.clip(shares - 2 * alpha * r + alpha * alpha * v, 1e-12, None)
        new = _em_step(p, jump / jump.sum(), base)
        done = np.abs(new - shares).max() < TOLERANCE
        shares = new
        if done:
            break
    return shares


def bootstrap_draws(probabilities: np.ndarray, calibration_prior: np.ndarray | None = None, resamples: int = 200,
                    seed: int = 0) -> np.ndarray:
    """Adjusted shares ``[resamples, K]`` of the sample resampled with replacement (seeded: a slide's report
    is the same on every run); the spread of any sum of classes is read off the same draws."""
    p = np.asarray(probabilities, np.float64)
    rng = np.random.default_rng(seed)
    return np.stack([prior_adjusted_shares(p[rng.integers(0, len(p), len(p))], calibration_prior)
                     for _ in range(resamples)])


def percentile_interval(draws: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    tail = 100 * (1 - level) / 2
    return np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)


def shares_with_interval(probabilities: np.ndarray, groups: tuple[list[int], ...] = (), resamples: int = 200,
                         level: float = 0.95, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adjusted shares of each class, then of each group of classes (their sum), with the percentile
    bootstrap interval of each, resampling cells: ``(shares, low, high)``, each ``[K + len(groups)]``.
    A group's interval is read off the same draws as its classes', not summed from theirs."""
    p = np.asarray(probabilities, np.float64)
    shares, draws = prior_adjusted_shares(p), bootstrap_draws(p, resamples=resamples, seed=seed)
    shares = np.append(shares, [shares[g].sum() for g in groups])
    low, high = percentile_interval(np.column_stack([draws] + [draws[:, g].sum(1) for g in groups]), level)
    return shares, low, high
