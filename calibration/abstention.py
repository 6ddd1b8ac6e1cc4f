"""When a cell may be called confident: the abstention threshold, and how a site's is certified.

The threshold is the lowest top-class probability at which the kept cells' accuracy reaches a target
on held labelled cells (calibration/fit.py's part B). For the bundled model (hundreds of held cells) the
observed accuracy is used. For a site (``cytoedge adapt``: a few dozen labelled cells) its one-sided
Clopper–Pearson lower bound is used, and under more than B's own class mix: B holds about as many cells
of each labelled class, a smear is mostly neutrophils and lymphocytes, and accuracy among kept cells
depends on the mix (the per-class terms do not). So the bound must reach the target under every
prevalence of ``site_prevalence_set`` (B's own mix and the expected smear differential); where no
threshold is certified, none is kept.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.summary import TriagePolicy

HELD_MIX = "held part B"
SMEAR_MIX = "expected smear differential"


def prevalence_weights(y: np.ndarray, prevalence: np.ndarray) -> np.ndarray:
    """Importance weights ``w_i = π_{y_i} / p̂_{y_i}`` that take the cells' own class mix p̂ to ``prevalence``
    π ``[K]``, renormalised over the classes among ``y`` (a class without cells cannot be reweighted)."""
    counts = np.bincount(y, minlength=len(prevalence)).astype(np.float64)
    present = counts > 0
    pi = np.where(present, prevalence, 0.0)
    if not pi.sum() > 0:
        raise CalibrationError(f"prevalence {list(prevalence)} gives no weight to the classes labelled")
    return (pi / pi.sum() / np.where(present, counts / counts.sum(), 1.0))[y]


def weighted_accuracy(correct: np.ndarray, w: np.ndarray, bound_confidence: float | None) -> tuple[float, float]:
    """(accuracy of cells weighted ``w``, Kish's effective sample size n_eff = (Σw)²/Σw²); with
    ``bound_confidence`` the accuracy is its one-sided Clopper–Pearson lower bound, taken as if n_eff cells
    had been seen with the weighted accuracy (an approximation: exact for equal weights, and the usual
    design-effect correction otherwise). Unit weights give the plain count and bound."""
    sw, sw2 = float(w.sum()), float((w * w).sum())
    if not sw:
        return 0.0, 0.0
    right_w, n_eff = float(w[correct].sum()), sw * sw / sw2
    if bound_confidence is None:
        return right_w / sw, n_eff
    right = right_w * sw / sw2  # weighted accuracy × n_eff
    return (float(stats.beta.ppf(1 - bound_confidence, right, n_eff - right + 1)) if right else 0.0), n_eff


def abstention_threshold(p: np.ndarray, y: np.ndarray, target: float, max_abstain: float,
                         bound_confidence: float | None = None, prevalences: Sequence[np.ndarray] = ()) -> float:
    """Lowest top-class probability to keep a cell so that accuracy among kept cells ≥ target: the
    observed accuracy, or with ``bound_confidence`` its one-sided Clopper–Pearson lower bound (few
    labelled cells must show more than a point estimate before a cell is called confident). With
    ``prevalences`` (class mixes ``[K]``) the target must also be reached with the cells reweighted to each
    (``prevalence_weights``, ``weighted_accuracy``): the kept cells' accuracy depends on the class mix, and
    the cells' own mix need not be the one the model will read. Where no threshold reaches the target,
    the result lies above every probability the held cells have, or, with ``bound_confidence``, above 1:
    no cell is kept, here or on the cells the bundle reads later (a site too small to certify any
    threshold must not pass its unseen cells of higher probability as confident)."""
    conf, correct = p.max(1), p.argmax(1) == y
    mixes = [np.ones(len(y))] + [prevalence_weights(y, pi) for pi in prevalences]
    for tau in np.unique(np.concatenate([[0.0], conf])):
        kept = conf >= tau
        if (~kept).mean() > max_abstain:
            return float(tau)
        if not kept.any():
            break
        if all(weighted_accuracy(correct[kept], w[kept], bound_confidence)[0] >= target for w in mixes):
            return float(tau)
    return float(np.nextafter(1.0, np.inf)) if bound_confidence is not None else float(conf.max())


def abstention_check(p: np.ndarray, y: np.ndarray, threshold: float, prevalences: Mapping[str, np.ndarray],
                     bound_confidence: float) -> list[dict]:
    """What the kept cells read under each named prevalence: the threshold read at, cells kept, effective
    cells, weighted accuracy and its lower bound (None where no cell is kept). A ``threshold`` above 1 (none
    certified) is read at 0, every held cell kept: how far the site is from the target."""
    conf, correct = p.max(1), p.argmax(1) == y
    threshold = threshold if threshold <= 1 else 0.0
    kept = conf >= threshold
    out = []
    for name, pi in prevalences.items():
        w = prevalence_weights(y, pi)[kept]
        accuracy, n_eff = weighted_accuracy(correct[kept], w, None)
        bound, _ = weighted_accuracy(correct[kept], w, bound_confidence)
        out.append({"prevalence": name, "threshold": threshold, "kept_cells": int(kept.sum()), "effective_cells": round(n_eff, 2),
                    "accuracy": round(accuracy, 4) if kept.any() else None,
                    "bound": round(bound, 4) if kept.any() else None})
    return out


def site_prevalence_set(y: np.ndarray, class_names: list[str], triage: Mapping | None, floor: float) -> dict:
    """The class mixes a site's abstention threshold must hold under, ``{name: {class: share}}`` over the
    classes labelled in ``y``: the cells' own, and the expected smear differential (``TriagePolicy
    .expected_differential`` with the bundle's ``triage`` overrides and ``floor``)."""
    if not isinstance(floor, (int, float)) or isinstance(floor, bool) or not 0 < floor < 1:
        raise CalibrationError(f"site_prevalence_floor must be a number strictly between 0 and 1 (the expected "
                               f"share of a class without a reference range), got {floor!r}")
    labelled = [class_names[c] for c in np.unique(y)]
    counts = np.bincount(y, minlength=len(class_names))
    smear = TriagePolicy.from_overrides(triage).expected_differential(class_names, floor)
    total = sum(smear[c] for c in labelled)
    return {HELD_MIX: {c: round(float(counts[class_names.index(c)] / len(y)), 4) for c in labelled},
            SMEAR_MIX: {c: round(smear[c] / total, 4) for c in labelled}}


def prevalence_vector(mix: Mapping[str, float], class_names: list[str]) -> np.ndarray:
    """A ``{class: share}`` mix as a vector over ``class_names`` (0 for a class it leaves out)."""
    return np.array([mix.get(c, 0.0) for c in class_names])
