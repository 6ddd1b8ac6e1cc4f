"""Fit the fast estimator's calibration from labelled cells' probe errors (pure numpy + scipy).

Input: ``E [N, K, P]`` — the masked denoising error of every class under every candidate probe —
and labels. The labelled cells are split in two (A, B) so that thresholds are not tuned on the data
that shaped the scores:

* on A: greedy probe selection with weights fitted by maximum likelihood (the score
  ``−Σ_k w_k e_ck`` as a multinomial logit), elimination margins (how far behind the eventual
  winner may be after k probes, quantile ``elimination_quantile``), temperature of the race's
  extrapolated gaps (one overall, and one per race depth: cells decided after 1, 2, ≥ 3 probes), anomaly normalisation (per-probe mean/std of the true class's log error
  ratio to the null class, or of its error where the network has no null class);
* on B: conformal threshold (LAC, split conformal, coverage ``coverage``), abstention threshold
  (lowest top-class probability keeping selective accuracy ≥ ``selective_accuracy``), anomaly
  threshold (quantile ``anomaly_quantile`` of known cells), and the abnormal operating point
  (highest threshold on P(abnormal) whose review flag reaches ``abnormal_sensitivity``).

A site adaptation (``cytoedge adapt``) is the same fit on a lab's own cells, with two differences: any
subset of the classes may be labelled, and per-class, per-probe error offsets are fitted on A with the
probe weights (``fit_class_offsets``), so that a class whose denoiser reads this site's cells
systematically better or worse than the others is corrected. What the labels cannot inform (the
abnormal operating point when no abnormal class is labelled) is kept from the source calibration.

A site's abstention threshold is certified by a lower confidence bound under several class mixes
(calibration/abstention.py).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy import optimize

from cytoedge.calibration.abstention import (HELD_MIX, SMEAR_MIX, abstention_check, abstention_threshold,
                                              prevalence_vector, site_prevalence_set)
from cytoedge.runtime.calibration_config import AnomalyNormalisation, Calibration, Thresholds
from cytoedge.runtime.decisions import anomaly_scores, anomaly_values, cell_temperatures, decide
from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.estimator import RaceSettings, run_race

DEFAULT_SETTINGS = {
    "max_probes": 6,
    "min_nll_gain": 0.002,
    "elimination_quantile": 0.995,
    "coverage": 0.95,
    "selective_accuracy": 0.95,
    "max_abstention": 0.15,
    "anomaly_quantile": 0.99,
    # Temperatures per race depth (cells decided after 1, 2, ≥ 3 probes): an early decision's gaps are
    # extrapolated from fewer measurements, so they need their own scale. A depth with fewer than
    # ``min_cells_per_temperature`` cells in A uses the single temperature.
    "depth_temperatures": 3,
    "min_cells_per_temperature": 20,
    "abnormal_sensitivity": 0.95,
    "split_a_fraction": 0.6,
    "seed": 0,
    # Site adaptation only: L2 penalty on the class offsets, in units of each probe's error spread
    # (0.01 and 0.1 did alike on BCCD, 5–20 labelled cells per class, 5 draws; the smaller lets the data speak).
    "class_offsets_l2": 0.01,
    # Site adaptation only: no cap on abstention, and the selective accuracy of the held part's kept cells
    # judged by its 90 % lower confidence bound against 0.90 (a few dozen labelled cells cannot show
    # 0.95; 30 of 30 right bound it at 0.926). A site the model reads poorly gets uncertain cells, not
    # confident ones: on BCCD the point estimate left 30 % of runs with confident cells 0.6 right.
    "site_max_abstention": 1.0,
    "site_selective_accuracy": 0.90,
    "site_accuracy_bound_confidence": 0.90,
    # Site adaptation only: the expected smear differential (the prevalence the bound must also hold under,
    # besides B's own mix) gives a class the triage policy has no reference range for (ig, erythroblast,
    # platelet, ...), or a range whose midpoint is lower, this share before renormalising: no class of the
    # bundle is assumed absent from a smear.
    "site_prevalence_floor": 0.01,
}



def _nll_and_grad(w: np.ndarray, feats: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Multinomial NLL of logits ``−feats @ w`` (feats ``[N,K,M]``) and its gradient in w."""
    z = -feats @ w
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    rows = np.arange(len(y))
    nll = -np.log(np.clip(p[rows, y], 1e-300, None)).mean()
    grad = (feats[rows, y] - np.einsum("nk,nkm->nm", p, feats)).mean(0)
    return float(nll), grad


def fit_weights(feats: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative probe weights maximising the likelihood of the labels."""
    m = feats.shape[2]
    res = optimize.minimize(_nll_and_grad, np.ones(m), args=(feats, y), jac=True, method="L-BFGS-B",
                            bounds=[(1e-6, None)] * m)
    return res.x, float(res.fun)


def select_probes(E: np.ndarray, y: np.ndarray, max_probes: int, min_gain: float) -> tuple[list[int], np.ndarray]:
    """Greedy forward selection: add the candidate probe that lowers the NLL most, refit weights."""
    centred = E - E.mean(1, keepdims=True)
    scale = centred.reshape(-1, E.shape[2]).std(0) + 1e-12
    feats = centred / scale  # per-probe standardised, so weights are comparable
    chosen: list[int] = []
    best_nll, best_w = np.log(E.shape[1]), np.zeros(0)
    while len(chosen) < max_probes:
        trials = []
        for cand in range(E.shape[2]):
            if cand in chosen:
                continue
            w, nll = fit_weights(feats[:, :, chosen + [cand]], y)
            trials.append((nll, cand, w))
        nll, cand, w = min(trials, key=lambda t: t[0])
        if chosen and best_nll - nll < min_gain:
            break
        chosen.append(cand)
        best_nll, best_w = nll, w
    weights = best_w / scale[chosen]
    # Order probes by their weight: the most informative first, so elimination starts early.
    order = np.argsort(-best_w, kind="stable")
    return [chosen[i] for i in order], weights[order]


def fit_class_offsets(feats: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Probe weights ``w ≥ 0 [M]`` and class offsets ``d [K, M]`` maximising the class-balanced likelihood
    of logits ``−Σ_m w_m (feats_cm + d_cm)`` (``feats [N,K,M]`` standardised per probe) with ``l2·|d|²``.
    Each labelled class weighs the same, as in balanced accuracy: a lab labels what it has, and its
    commonest class must not buy its offsets from the rare ones. Classes without labels get offsets
    too: the labelled ones win them over, within the penalty."""
    n, k, m = feats.shape
    rows = np.arange(n)
    counts = np.bincount(y, minlength=k).astype(np.float64)
    cell_w = 1.0 / (counts[y] * np.count_nonzero(counts))  # sums to 1

    def nll_and_grad(theta):
        w, d = theta[:m], theta[m:].reshape(k, m)
        shifted = feats + d[None]
        z = -(shifted * w).sum(2)
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        nll = -(cell_w * np.log(np.clip(p[rows, y], 1e-300, None))).sum() + l2 * (d ** 2).sum()
        g = p.copy()
        g[rows, y] -= 1.0
        g *= cell_w[:, None]  # d(weighted NLL)/dz
        grad_w = -np.einsum("nk,nkm->m", g, shifted)
        grad_d = -g.sum(0)[:, None] * w[None, :] + 2.0 * l2 * d
        return float(nll), np.concatenate([grad_w, grad_d.ravel()])

    theta0 = np.concatenate([np.ones(m), np.zeros(k * m)])
    res = optimize.minimize(nll_and_grad, theta0, jac=True, method="L-BFGS-B",
                            bounds=[(1e-6, None)] * m + [(None, None)] * (k * m))
    return res.x[:m], res.x[m:].reshape(k, m)


def elimination_margins(Ew: np.ndarray, quantile: float) -> np.ndarray:
    """Per probe k: the ``quantile`` of how far the eventual winner trails the leader after k probes."""
    cum = np.cumsum(Ew, axis=2)  # [N, K, M] running weighted scores
    winner = cum[:, :, -1].argmin(1)
    rows = np.arange(Ew.shape[0])
    deficit = cum[rows, winner, :] - cum.min(1)  # [N, M]
    return np.quantile(deficit, quantile, axis=0)


def offline_race(Ew: np.ndarray, settings: RaceSettings, null: np.ndarray | None = None):
    """The race on precomputed errors (``Ew [N,K,M]`` *un*-weighted errors of the chosen probes;
    ``null [N,M]`` the null class's, measured alongside as the live estimator does)."""
    k = Ew.shape[1]
    table = Ew if null is None else np.concatenate([Ew, null[:, None, :]], axis=1)
    return run_race(Ew.shape[0], k, settings, lambda cells, classes, j: table[cells, classes, j],
                    None if null is None else k)


def fit_temperature(gaps: np.ndarray, y: np.ndarray) -> float:
    def nll(log_t: float) -> float:
        z = -gaps / np.exp(log_t)
        z -= z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())

    return float(np.exp(optimize.minimize_scalar(nll, bounds=(-8, 8), method="bounded").x))


def fit_depth_temperatures(gaps: np.ndarray, depth: np.ndarray, y: np.ndarray, groups: int, min_cells: int,
                           fallback: float) -> list[float]:
    """One temperature per race depth 1 … ``groups`` (the last for that depth and deeper)."""
    group = np.minimum(depth, groups)
    return [fit_temperature(gaps[group == g], y[group == g]) if (group == g).sum() >= min_cells else fallback
            for g in range(1, groups + 1)]


def conformal_threshold(p: np.ndarray, y: np.ndarray, coverage: float) -> float:
    """Split-conformal LAC threshold on 1 − p_true (Sadinle et al. 2019)."""
    scores = 1.0 - p[np.arange(len(y)), y]
    n = len(scores)
    level = min(1.0, np.ceil((n + 1) * coverage) / n)
    return float(np.quantile(scores, level, method="higher"))


def abnormal_threshold(p: np.ndarray, anomaly: np.ndarray, y: np.ndarray, abnormal_mask: np.ndarray,
                       thresholds: Thresholds, sensitivity: float) -> float:
    """Highest threshold on P(abnormal) whose review flag (abnormal ∪ uncertain ∪ anomalous) reaches the
    target, the other ``thresholds`` as fitted (their ``abnormal`` is the one tried)."""
    truth = abnormal_mask[y]
    if not truth.any():
        raise CalibrationError("the calibration data holds no cells of an abnormal class")
    for tau in np.linspace(0.99, 0.01, 99):
        d = decide(p, anomaly, abnormal_mask, replace(thresholds, abnormal=float(tau)))
        review = d.abnormal | d.uncertain | d.anomalous
        if review[truth].mean() >= sensitivity:
            return float(tau)
    return 0.01


# The A/B split keeps at least one cell of a class on each side from this many cells on (see split_ab).
MIN_CELLS_PER_CLASS = 2


def _cells_in_a(n: int, fraction: float) -> int:
    """How many of a class's ``n`` cells go to A: ``fraction`` of them, rounded, but at least one in A
    and one in B whenever the class has ``MIN_CELLS_PER_CLASS`` or more."""
    n_a = int(round(fraction * n))
    return min(max(n_a, 1), n - 1) if n >= MIN_CELLS_PER_CLASS else n_a


def check_split_fraction(fraction) -> None:
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise CalibrationError(f"split_a_fraction must be a number strictly between 0 and 1 (the share of each "
                               f"class's cells that the probes are fitted on), got {fraction!r}")


def check_fit_labels(y: np.ndarray, class_names: list[str], abnormal_classes: list[str] | None = None,
                     settings: dict | None = None, every_class: bool = True) -> None:
    """Refuse labels the calibration cannot be fitted on, before any error is measured: every class
    present (or, for a site adaptation, ``every_class=False``, at least two), with enough cells for the
    A/B split to put some in each part, and an abnormal class among the bundle's (its review threshold
    is set on B). Raises CalibrationError with one line naming what is needed."""
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    check_split_fraction(s["split_a_fraction"])
    y = np.asarray(y)
    if y.ndim != 1:
        raise CalibrationError(f"labels must be one class id per cell, got an array of shape {y.shape}")
    counts = [int((y == c).sum()) for c in range(len(class_names))]
    missing = [name for name, n in zip(class_names, counts) if not n]
    if missing and every_class:
        raise CalibrationError(f"no labelled cells of class(es) {missing}; calibration needs every class")
    if sum(n > 0 for n in counts) < 2:
        raise CalibrationError(f"labelled cells of {sum(n > 0 for n in counts)} class(es); at least two are needed")
    short = [f"{name} ({n})" for name, n in zip(class_names, counts) if 0 < n < MIN_CELLS_PER_CLASS]
    if short:
        raise CalibrationError(f"calibration needs at least {MIN_CELLS_PER_CLASS} labelled cells of every class "
                               f"(it fits on part of each class and checks on the rest); too few in: "
                               f"{', '.join(short)}; add labelled cells of those classes")
    if abnormal_classes is not None and not any(c in class_names for c in abnormal_classes):
        raise CalibrationError(f"none of the abnormal classes {list(abnormal_classes)} is among the bundle's "
                               f"classes {list(class_names)}: the abnormal review threshold cannot be fitted")


def split_ab(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of cell indices into A and B (each class with two or more cells has some in both)."""
    check_split_fraction(fraction)
    rng = np.random.default_rng(seed)
    a = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        a.extend(idx[: _cells_in_a(len(idx), fraction)])
    mask = np.zeros(len(y), bool)
    mask[a] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def fit_calibration(E: np.ndarray, y: np.ndarray, class_names: list[str], abnormal_classes: list[str],
                    settings: dict | None = None, site_of: Calibration | None = None) -> dict:
    """Everything the fast estimator and the flags need, as a JSON-ready dict: calibration.json's fields
    but the probes (``chosen_candidates`` indexes the candidates), the noise bank and the provenance, which
    calibration/artefact.write_calibration adds.

    ``E [N, K, P]`` (or ``[N, K+1, P]``: the last column the null class's) masked errors of every
    class under every candidate probe; ``y [N]`` labels. The labels are checked first
    (``check_fit_labels``, which a caller may also run before measuring ``E``). ``site_of``: the
    source bundle's calibration when this is a site adaptation (see the module docstring).
    """
    s = {**DEFAULT_SETTINGS, **(settings or {})}
    k = len(class_names)
    if E.ndim != 3 or E.shape[0] != len(y) or E.shape[1] not in (k, k + 1):
        raise CalibrationError(f"error matrix has shape {E.shape}; expected [{len(y)}, {k} (+1 null), probes]")
    E, E_null = (E, None) if E.shape[1] == k else (E[:, :k], E[:, k])
    check_fit_labels(y, class_names, abnormal_classes, s, every_class=site_of is None)
    if E.shape[2] < 1 or not np.isfinite(E).all():
        raise CalibrationError(f"error matrix of shape {E.shape} has no probes or non-finite errors")
    a, b = split_ab(y, s["split_a_fraction"], s["seed"])
    if not len(a) or not len(b):  # check_fit_labels rules this out; kept so a change there cannot crash here
        raise CalibrationError(f"the A/B split left {len(a)} cells to fit on and {len(b)} to check on; both need some")
    chosen, weights = select_probes(E[a], y[a], s["max_probes"], s["min_nll_gain"])
    Ew = E[:, :, chosen]
    null_w = None if E_null is None else E_null[:, chosen]
    offsets = None
    if site_of is not None:
        scale = Ew[a].reshape(-1, len(chosen)).std(0) + 1e-12
        w_std, d_std = fit_class_offsets(Ew[a] / scale, y[a], s["class_offsets_l2"])
        weights, offsets = w_std / scale, d_std * scale
    terms_a = (Ew[a] + (0.0 if offsets is None else offsets[None])) * weights
    margins = elimination_margins(terms_a, s["elimination_quantile"])
    race_settings = RaceSettings(weights, margins, offsets)
    race_a = offline_race(Ew[a], race_settings)
    temperature = fit_temperature(race_a.gaps, y[a])
    by_depth = fit_depth_temperatures(race_a.gaps, race_a.depth, y[a], s["depth_temperatures"],
                                      s["min_cells_per_temperature"], temperature)
    true_w = Ew[a, :, :][np.arange(len(a)), y[a]] * weights
    known = anomaly_values(true_w, None if null_w is None else null_w[a] * weights)
    normalisation = AnomalyNormalisation("leader_error" if null_w is None else "null_ratio", known.mean(0),
                                         known.std(0) + 1e-12)
    race_b = offline_race(Ew[b], race_settings, None if null_w is None else null_w[b])
    p_b = race_b.probabilities(cell_temperatures(race_b.depth, temperature, by_depth))
    anomaly_b = anomaly_scores(race_b.leader_errors, race_b.null_errors, normalisation)
    abnormal_mask = np.array([c in abnormal_classes for c in class_names])
    if site_of is None:
        abstention = abstention_threshold(p_b, y[b], s["selective_accuracy"], s["max_abstention"])
    else:
        s["site_prevalences"] = site_prevalence_set(y[b], class_names, site_of.triage, s["site_prevalence_floor"])
        s["site_prevalence_source"] = (
            f"'{HELD_MIX}': its class counts; '{SMEAR_MIX}': midpoints of the triage policy's differential_ranges "
            f"({'with the bundle triage overrides' if site_of.triage else 'the default adult ranges'}), at least "
            f"site_prevalence_floor {s['site_prevalence_floor']:g} a class, renormalised over the classes labelled in B")
        mixes = {name: prevalence_vector(mix, class_names) for name, mix in s["site_prevalences"].items()}
        abstention = abstention_threshold(p_b, y[b], s["site_selective_accuracy"], s["site_max_abstention"],
                                          s["site_accuracy_bound_confidence"],
                                          [pi for name, pi in mixes.items() if name != HELD_MIX])
    fitted = Thresholds(conformal=conformal_threshold(p_b, y[b], s["coverage"]), abstention=abstention,
                        anomaly=float(np.quantile(anomaly_b, s["anomaly_quantile"])), abnormal=float("nan"))
    if site_of is not None and not abnormal_mask[y[b]].any():
        fitted = replace(fitted, abnormal=site_of.thresholds.abnormal)  # no abnormal cell to set it on
    else:
        fitted = replace(fitted, abnormal=abnormal_threshold(p_b, anomaly_b, y[b], abnormal_mask, fitted,
                                                             s["abnormal_sensitivity"]))
    extra = {} if offsets is None else {
        "class_offsets": offsets.tolist(), "labelled_classes": [class_names[c] for c in np.unique(y)],
        "abstention_check": abstention_check(p_b, y[b], abstention, mixes, s["site_accuracy_bound_confidence"])}
    return {
        "chosen_candidates": [int(c) for c in chosen],
        "probe_weights": weights.tolist(),
        "elimination_margins": margins.tolist(),
        "anomaly_normalisation": normalisation.to_dict(),
        "temperature": temperature,
        "temperature_by_depth": by_depth,
        "conformal_threshold": fitted.conformal,
        "abstention_threshold": fitted.abstention,
        "anomaly_threshold": fitted.anomaly,
        "abnormal_threshold": fitted.abnormal,
        "settings": s,
        "fit_cells": {"A": int(len(a)), "B": int(len(b))},
        **extra,
    }
