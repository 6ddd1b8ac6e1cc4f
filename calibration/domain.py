"""Fitting the out-of-domain alarm's reference (``domain.json``) on calibration cells.

The reference holds what runtime/domain_alarm.py applies at run time: the per-probe mean and std of
the typicality value and its calibrated per-cell range, the per-class (and pooled) mean and std of
anomaly score and typicality, and the shift threshold per run size — the 99th percentile of the
shift over bootstrap runs of calibration cells drawn with random class mixes, so a slide of mostly
one type is among them. Everything is fitted on the calibration data alone; foreign data only
measures it (benchmarks/bench_site.py).
"""
from __future__ import annotations

import warnings

import numpy as np

from cytoedge.runtime.calibration_config import AnomalyNormalisation
from cytoedge.runtime.decisions import anomaly_scores
from cytoedge.runtime.domain_alarm import run_shift, typicality_values

RUN_SIZES = (10, 20, 50, 100, 200, 500, 1000)
BOOTSTRAP_RUNS = 2000
RUN_QUANTILE = 0.99
DIRICHLET_ALPHA = 0.5  # class mixes of the bootstrap runs: skewed ones (a slide of mostly one type) included
CELL_QUANTILES = (0.002, 0.998)


def _stats(a: np.ndarray, z: np.ndarray) -> dict:
    return {"anomaly_mean": float(a.mean()), "anomaly_std": float(a.std() + 1e-6),
            "typicality_mean": float(z.mean()), "typicality_std": float(z.std() + 1e-6), "cells": int(len(a))}


def probe_stats(t: np.ndarray, min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-probe mean and std of ``t [N, P]`` (NaN where a cell's race stopped before the probe). A late
    probe that fewer than ``min_cells`` cells reach cannot show its spread (one cell gives a std of 0, and
    a run cell there a z of millions): it takes the median spread of the probes that can (with fewer than
    ``min_cells`` cells in all, of those every cell reached), and, below two cells, their median mean too."""
    reached = np.isfinite(t).sum(axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        mean, std = np.nanmean(t, axis=0), np.nanstd(t, axis=0)
    enough = reached >= min(min_cells, int(reached.max()))  # the first probe: every cell runs it
    std = np.where(enough, std, np.median(std[enough])) + 1e-12
    mean = np.where(reached >= 2, mean, np.median(mean[enough]))
    return mean, std


def _run_reference(a: np.ndarray, z: np.ndarray, called: np.ndarray, min_cells: int) -> dict:
    """Pooled and per-class (classes called at least ``min_cells`` times) anomaly and typicality statistics."""
    return {"all": _stats(a, z), "by_class": {c: _stats(a[called == c], z[called == c])
                                              for c in sorted(set(called.tolist())) if (called == c).sum() >= min_cells}}


def fit_domain(leader_weighted: np.ndarray, null_weighted: np.ndarray | None, called: list[str],
               anomaly_normalisation: AnomalyNormalisation, seed: int = 0, min_cells: int = 10) -> dict:
    """The domain reference from the race's weighted errors on calibration cells and the class each
    was called (classes called fewer than ``min_cells`` times use the pooled statistics)."""
    t = typicality_values(leader_weighted, null_weighted)
    mean, std = probe_stats(t, min_cells)
    typical = {"mean": mean.tolist(), "std": std.tolist()}
    z = np.nanmean((t - mean[None, :]) / std[None, :], axis=1)
    a = anomaly_scores(leader_weighted, null_weighted, anomaly_normalisation)
    lo, hi = np.quantile(z, CELL_QUANTILES)
    called = np.asarray(called)
    classes = sorted(set(called.tolist()))
    domain = {"typicality": {**typical, "range": [float(lo), float(hi)]},
              "run": {**_run_reference(a, z, called, min_cells), "sizes": list(RUN_SIZES)}}
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(called == c) for c in classes]
    names = called.tolist()
    thresholds = []
    for n in RUN_SIZES:
        shifts = []
        for _ in range(BOOTSTRAP_RUNS):
            counts = rng.multinomial(n, rng.dirichlet(np.full(len(classes), DIRICHLET_ALPHA)))
            idx = np.concatenate([rng.choice(m, k) for m, k in zip(members, counts) if k])
            # The reference's per-class means are estimates from a few dozen cells each; comparing each run
            # with a reference from a resample puts that error into the threshold (against the one fitted
            # reference, 200-cell slides of held-out PBC cells raised the alarm one time in five).
            ref = rng.integers(0, len(a), len(a))
            resampled = {"run": _run_reference(a[ref], z[ref], called[ref], min_cells)}
            shifts.append(run_shift(a[idx], z[idx], [names[i] for i in idx], resampled))
        thresholds.append(float(np.quantile(shifts, RUN_QUANTILE)))
    domain["run"]["thresholds"] = thresholds
    domain["method"] = ("cell: typicality (z of log null-class error) outside its calibration quantiles "
                        f"{list(CELL_QUANTILES)}; run: shift of mean anomaly and typicality, standardised by "
                        "the called class's calibration cells, above the "
                        f"{RUN_QUANTILE} quantile of {BOOTSTRAP_RUNS} bootstrap runs per size with "
                        f"Dirichlet({DIRICHLET_ALPHA}) class mixes, each against a reference from a resample of "
                        "the cells")
    return domain


DOMAIN_FILE = "domain.json"


def race_features(bundle, backend, batch) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The live fast estimator's weighted leader and null errors and class gaps (0 for the leader) for ``batch``."""
    from cytoedge.runtime.estimator import estimate

    race = estimate(batch, bundle, backend)
    return race.leader_errors, race.null_errors, race.gaps


def fit_domain_on_cells(bundle, backend, batches, provenance: dict) -> dict:
    """The domain reference of ``bundle`` (with its current calibration) from calibration cells
    (an iterable of CellBatch), with its provenance."""
    leaders, nulls, called = [], [], []
    for batch in batches:
        leader, null, gaps = race_features(bundle, backend, batch)
        leaders.append(leader)
        nulls.append(null)
        called += [bundle.class_names[k] for k in gaps.argmin(1)]
    null_all = None if nulls[0] is None else np.concatenate(nulls)
    domain = fit_domain(np.concatenate(leaders), null_all, called, bundle.calibration.anomaly_normalisation)
    return {"format_version": 1, **domain, "provenance": provenance}


def write_domain(bundle, domain: dict) -> None:
    """Write ``domain.json`` into the bundle and list it in the manifest (other files untouched)."""
    import json

    from cytoedge.runtime.bundle import write_manifest

    (bundle.path / DOMAIN_FILE).write_text(json.dumps(domain, indent=2) + "\n")
    manifest = bundle.manifest
    manifest["domain"] = DOMAIN_FILE
    manifest["files"][DOMAIN_FILE] = {"sha256": ""}
    write_manifest(bundle.path, manifest)
