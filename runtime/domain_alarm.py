"""The out-of-domain alarm, applied at run time: cells unlike the calibration cells, one by one and as a run.

Two numbers per cell, both from errors the fast estimator measures anyway:
- the *anomaly score* (runtime/decisions.py): how little the best class explains the cell
  beyond the unconditional model — high for a cell type the model never saw;
- the *typicality*: the z-scored log of the unconditional (null-class) denoising error itself,
  two-sided — very low for an image with nothing to denoise (uniform, blank, out of focus), very
  high for one no blood cell resembles (noise, debris, another stain's texture).
A cell outside the calibrated typicality range is *atypical*: anomalous, never "confident".

A run (a classify call, a slide) raises the alarm when the mean of its cells' anomaly scores and
typicalities, each standardised by the calibration cells *of the class the cell was called*, has
moved further than random runs of calibration cells ever move. Both numbers depend on the class (a
lymphocyte is easier to denoise than a neutrophil), so the per-class standardisation keeps a slide
of mostly one type — a leukaemia, a folder of one class — from looking foreign.

This module only applies the bundle's domain reference; calibration/domain.py fits it.
"""
from __future__ import annotations

import numpy as np

MIN_RUN = 10  # fewer cells than this: no verdict on the run
MIN_RUN_SHIFT = 0.25  # standard deviations: the bootstrap threshold of a run of ~150 calibration cells


def typicality_values(leader_weighted: np.ndarray, null_weighted: np.ndarray | None) -> np.ndarray:
    """Per probe (NaN = not run): log of the null class's weighted error (the leader's without a null class)."""
    return np.log(null_weighted if null_weighted is not None else leader_weighted)


def typicality_scores(leader_weighted: np.ndarray, null_weighted: np.ndarray | None, domain: dict) -> np.ndarray:
    """Mean over the probes a cell ran of the z-scored typicality value."""
    t = typicality_values(leader_weighted, null_weighted)
    z = (t - np.asarray(domain["typicality"]["mean"])[None, :]) / np.asarray(domain["typicality"]["std"])[None, :]
    return np.nanmean(z, axis=1)


def atypical(typicality: np.ndarray, domain: dict) -> np.ndarray:
    lo, hi = domain["typicality"]["range"]
    return (typicality < lo) | (typicality > hi)


def _standardised(anomaly: np.ndarray, typicality: np.ndarray, called: list[str], domain: dict):
    by_class = domain["run"]["by_class"]
    ref = [by_class.get(c) or domain["run"]["all"] for c in called]
    a = (anomaly - np.array([r["anomaly_mean"] for r in ref])) / np.array([r["anomaly_std"] for r in ref])
    t = (typicality - np.array([r["typicality_mean"] for r in ref])) / np.array([r["typicality_std"] for r in ref])
    return a, t


def run_shift(anomaly: np.ndarray, typicality: np.ndarray, called: list[str], domain: dict) -> float:
    """How far a run's mean anomaly score and typicality lie from the calibration cells' of the same
    called classes (in their per-cell standard deviations)."""
    a, t = _standardised(anomaly, typicality, called, domain)
    return float(np.hypot(a.mean(), t.mean()))


def run_threshold(n: int, domain: dict) -> float:
    """The calibrated shift threshold for a run of ``n`` cells (interpolated in log n), never below
    MIN_RUN_SHIFT: resampling the calibration cells shows sampling noise only, while a lab's own slides
    also vary from day to day, and a large run would otherwise be flagged for that."""
    sizes, thresholds = domain["run"]["sizes"], domain["run"]["thresholds"]
    return max(float(np.interp(np.log(n), np.log(sizes), thresholds)), MIN_RUN_SHIFT)


def run_alarm(anomaly: np.ndarray, typicality: np.ndarray, called: list[str], domain: dict | None) -> dict:
    """The run-level verdict (JSON-ready): raised, the shift, its threshold, and why. ``called``: the
    class each cell was given."""
    anomaly, typicality = np.asarray(anomaly, float), np.asarray(typicality, float)
    keep = np.isfinite(anomaly) & np.isfinite(typicality)
    called = [c for c, k in zip(called, keep) if k]
    n = int(keep.sum())
    if domain is None:
        return {"assessed": False, "raised": False, "cells": n, "reason": "the bundle's calibration has no domain "
                                                                          "reference (recalibrate)"}
    if n < MIN_RUN:
        return {"assessed": False, "raised": False, "cells": n, "reason": f"fewer than {MIN_RUN} cells"}
    shift = run_shift(anomaly[keep], typicality[keep], called, domain)
    threshold = run_threshold(n, domain)
    out = {"assessed": True, "raised": shift > threshold, "cells": n, "shift": round(shift, 4),
           "threshold": round(threshold, 4), "atypical_cells": int(atypical(typicality[keep], domain).sum())}
    if out["raised"]:
        out["reason"] = ("cells unlike this model's calibration data (shift {:.2f} > {:.2f} over {} cells); results "
                         "unreliable until the site is adapted".format(shift, threshold, n))
    return out


def records_alarm(records: list[dict], domain: dict | None) -> dict:
    """``run_alarm`` over result records; cells the estimator did not assess (the reference
    estimator gives no anomaly score) do not count."""
    def number(value) -> float:
        return float("nan") if value is None else float(value)

    return run_alarm(np.array([number(r.get("anomaly_score")) for r in records]),
                     np.array([number(r.get("typicality")) for r in records]), [r["class"] for r in records], domain)
