"""The exact binomial (Clopper–Pearson) interval of a count: what Rümke's table gives for a differential
(CLSI H20-A2) and what a red-cell share is reported with. One implementation for the runtime (grading)
and calibration (agreement with readers)."""
from __future__ import annotations


def exact_interval(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson interval of ``count`` of ``n``, as fractions (5 of 100: 1.6–11.3 %); NaN for n = 0."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= count <= n:
        raise ValueError(f"count {count} is outside 0-{n}")
    a = (1.0 - level) / 2
    lo = float(beta.ppf(a, count, n - count + 1)) if count > 0 else 0.0
    hi = float(beta.ppf(1 - a, count + 1, n - count)) if count < n else 1.0
    return lo, hi
