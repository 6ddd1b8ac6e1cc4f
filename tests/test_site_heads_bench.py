"""The linear head of benchmarks/bench_site_heads.py, on generated error features whose classes are known."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_site_heads as bench  # noqa: E402


def generated_errors(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``E [N, K+1, P]``: each cell's own class denoises best, scaled by a per-cell difficulty that the
    null class shares (what the likelihood-ratio features cancel)."""
    rng = np.random.default_rng(seed)
    k, p = 4, 6
    y = np.repeat(np.arange(k), n_per_class)
    difficulty = rng.lognormal(0.0, 1.0, size=(len(y), 1, 1))
    E = np.exp(rng.normal(0.0, 0.15, size=(len(y), k + 1, p)))
    E[np.arange(len(y)), y] *= 0.8
    return E * difficulty, y


def test_logistic_head_separates_and_the_ratio_features_ignore_difficulty():
    E, y = generated_errors(40, seed=1)
    ratio = bench.k_shot(bench.feature_sets(E)["log errors − null's"], y, k=10, C=1.0, draws=3)
    assert min(ratio) > 0.9
    harder = E * np.random.default_rng(2).lognormal(0.0, 2.0, size=(len(y), 1, 1))
    assert bench.k_shot(bench.feature_sets(harder)["log errors − null's"], y, k=10, C=1.0, draws=3) == \
        pytest.approx(ratio)
    assert np.mean(bench.k_shot(bench.feature_sets(harder)["log errors"], y, k=10, C=1.0, draws=3)) < np.mean(ratio)


def test_fit_logistic_recovers_a_linear_rule():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 2))
    y = (X[:, 0] - X[:, 1] > 0).astype(int)
    classes, W, b = bench.fit_logistic(X, y, C=10.0)
    called = classes[(X @ W + b).argmax(1)]
    assert bench.balanced_accuracy(y, called, 2) > 0.97
    assert W[0, 1] - W[0, 0] > 0 and W[1, 1] - W[1, 0] < 0
