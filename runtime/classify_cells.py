"""Where a cell's class is decided: run the chosen estimator, apply calibration, build records.

``fast`` (default): the calibrated probe race (runtime/estimator.py), then probabilities, conformal
set and flags (runtime/decisions.py). ``reference``: CytoDiffusion's protocol
(runtime/reference_estimator.py), uncalibrated scores only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.decisions import CellDecisions, anomaly_scores, cell_temperatures, decide
from cytoedge.runtime.domain_alarm import typicality_scores
from cytoedge.runtime.errors import CalibrationError, CytoedgeError

ESTIMATORS = ("fast", "reference")


@dataclass
class FastOutcome:
    decisions: CellDecisions
    nfe: np.ndarray
    temperature: np.ndarray  # per cell: the calibrated temperature its probabilities used


def score_cells_fast(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend) -> FastOutcome:
    """Calibrated probabilities, uncertainty, anomaly score and flags for every cell (arrays)."""
    from cytoedge.runtime.estimator import estimate

    race = estimate(batch, bundle, backend)
    cal = bundle.calibration
    temperature = cell_temperatures(race.depth, cal.temperature, cal.temperature_by_depth)
    p = race.probabilities(temperature)
    try:
        anomaly = anomaly_scores(race.leader_errors, race.null_errors, cal.anomaly_normalisation)
    except ValueError as e:
        raise CalibrationError(f"{bundle.path}: {e}") from None
    abnormal_mask = np.array([c in bundle.abnormal_classes for c in bundle.class_names])
    typicality = typical_range = None
    if bundle.domain is not None:
        typicality = typicality_scores(race.leader_errors, race.null_errors, bundle.domain)
        typical_range = tuple(bundle.domain["typicality"]["range"])
    return FastOutcome(decide(p, anomaly, abnormal_mask, cal.thresholds, typicality, typical_range), race.nfe, temperature)


def classify_batch(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, estimator: str = "fast",
                   reference_settings=None) -> list[dict]:
    """One JSON-ready record per cell (``reference_settings``: a ReferenceSettings for the reference)."""
    if estimator not in ESTIMATORS:
        raise CytoedgeError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if estimator == "reference":
        return _reference_records(batch, bundle, backend, reference_settings)
    return fast_records(score_cells_fast(batch, bundle, backend), bundle.class_names)


def confidence_label(d: CellDecisions, i: int) -> str:
    """A short word for the table view: what a reader should do with this cell."""
    if d.anomalous[i]:
        return "anomalous"
    if d.uncertain[i]:
        return "uncertain"
    return "confident"


def fast_records(outcome: FastOutcome, names: list[str]) -> list[dict]:
    d = outcome.decisions
    return [{
        "class": names[int(d.class_id[i])],
        "probabilities": {n: round(float(v), 6) for n, v in zip(names, d.probabilities[i])},
        "prediction_set": [n for n, s in zip(names, d.prediction_sets[i]) if s],
        "uncertainty": {"entropy": round(float(d.entropy[i]), 6), "margin": round(float(d.margin[i]), 6)},
        "anomaly_score": round(float(d.anomaly_score[i]), 4),
        "typicality": None if np.isnan(d.typicality[i]) else round(float(d.typicality[i]), 4),
        "abnormal_probability": round(float(d.abnormal_probability[i]), 6),
        "flags": {"abnormal": bool(d.abnormal[i]), "uncertain": bool(d.uncertain[i]),
                  "anomalous": bool(d.anomalous[i]), "atypical": bool(d.atypical[i])},
        "confidence_label": confidence_label(d, i),
        "nfe": int(outcome.nfe[i]),
        "estimator": "fast",
    } for i in range(len(d.class_id))]


def _reference_records(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, settings) -> list[dict]:
    from cytoedge.runtime.reference_estimator import ReferenceSettings, classify_reference

    res = classify_reference(batch, bundle, backend, settings or ReferenceSettings())
    names = bundle.class_names
    return [{
        "class": names[int(res.class_id[i])],
        "scores": {n: round(float(e), 6) for n, e in zip(names, res.mean_error[i])},
        "score_kind": "mean masked denoising error (lower = better fit)",
        "survived": [n for n, s in zip(names, res.survived[i]) if s],
        "confidence_label": "uncalibrated",
        "nfe": int(res.nfe[i]),
        "estimator": "reference",
    } for i in range(len(batch))]


def mark_unreliable(records: list[dict], verdict: dict) -> list[dict]:
    """While the alarm is raised no cell of the run is "confident": they become "unreliable"."""
    if not (verdict or {}).get("raised"):
        return records
    for r in records:
        for holder in (r, r.get("estimator_detail") or {}):
            if holder.get("confidence_label") == "confident":
                holder["confidence_label"] = "unreliable"
        r.setdefault("flags", {})["out_of_domain"] = True
    return records


def mark_no_cell(records: list[dict], crops: list, cell_type: str = "white") -> list[dict]:
    """Crops with no cell of the bundle's ``cell_type`` near their centre (runtime/detection.holds_a_cell)
    are anomalous and say so (``flags.no_cell``), whatever class the estimator found closest."""
    from cytoedge.runtime.detection import holds_a_cell

    for r, rgb in zip(records, crops):
        empty = not holds_a_cell(rgb, cell_type)
        r.setdefault("flags", {})["no_cell"] = empty
        if empty:
            r["flags"]["anomalous"] = True
            if "confidence_label" in r:
                r["confidence_label"] = "anomalous"
    return records
