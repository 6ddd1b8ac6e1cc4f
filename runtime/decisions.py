"""From calibrated numbers to per-cell decisions: uncertainty, prediction sets, anomaly, flags.

Pure numpy; the thresholds come from the bundle's calibration artefact.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CellDecisions:
    probabilities: np.ndarray   # [N, K]
    class_id: np.ndarray        # [N]
    entropy: np.ndarray         # [N] nats
    margin: np.ndarray          # [N] top-1 minus top-2 probability
    prediction_sets: np.ndarray  # [N, K] bool: conformal set at the calibrated coverage
    abnormal_probability: np.ndarray
    anomaly_score: np.ndarray
    abnormal: np.ndarray
    uncertain: np.ndarray
    anomalous: np.ndarray       # a novel type (anomaly score) or an atypical image (typicality)
    typicality: np.ndarray      # NaN where the bundle has no domain reference
    atypical: np.ndarray


def concat_decisions(parts: list[CellDecisions]) -> CellDecisions:
    """Join the decisions of consecutive batches into one."""
    from dataclasses import fields

    return CellDecisions(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(CellDecisions)})


ANOMALY_KINDS = ("null_ratio", "leader_error")


def anomaly_values(leader_weighted_errors: np.ndarray, null_weighted_errors: np.ndarray | None) -> np.ndarray:
    """Per probe (NaN = not run): ``log(error of the best class / error of the null class)`` where the
    network has a null class, else the best class's weighted error.

    The ratio is a likelihood ratio: a cell of a type the model never saw gains little from any
    class over the unconditional prediction, however simple or busy the image is. The plain error
    confounds novelty with image complexity (a small dense nucleus is easy to denoise).
    """
    if null_weighted_errors is None:
        return leader_weighted_errors
    return np.log(leader_weighted_errors / null_weighted_errors)


def anomaly_scores(leader_weighted_errors: np.ndarray, null_weighted_errors: np.ndarray | None,
                   normalisation: dict) -> np.ndarray:
    """Mean over the probes a cell ran of the z-scored anomaly value (``anomaly_values``), with the
    per-probe mean/std of known cells from the calibration."""
    kind = normalisation.get("kind", "leader_error")
    if kind not in ANOMALY_KINDS:
        raise ValueError(f"anomaly normalisation kind {kind!r} is not one of {ANOMALY_KINDS}")
    if (kind == "null_ratio") != (null_weighted_errors is not None):
        raise ValueError(f"anomaly normalisation is {kind!r} but the race {'did not measure' if kind == 'null_ratio' else 'measured'} "
                         "null-class errors; recalibrate the bundle (`cytoedge calibrate`)")
    values = anomaly_values(leader_weighted_errors, null_weighted_errors)
    z = (values - np.asarray(normalisation["mean"])[None, :]) / np.asarray(normalisation["std"])[None, :]
    return np.nanmean(z, axis=1)


def cell_temperatures(depth: np.ndarray, cal: dict) -> np.ndarray:
    """Each cell's temperature: by how many probes its race ran (``temperature_by_depth``, the last
    entry for that depth and deeper), else the single calibrated temperature."""
    by_depth = cal.get("temperature_by_depth")
    if not by_depth:
        return np.full(len(depth), float(cal["temperature"]))
    return np.asarray(by_depth, np.float64)[np.clip(np.asarray(depth) - 1, 0, len(by_depth) - 1)]


def decide(p: np.ndarray, anomaly: np.ndarray, abnormal_mask: np.ndarray, cal: dict,
           typicality: np.ndarray | None = None, typical_range: tuple[float, float] | None = None) -> CellDecisions:
    """Apply the calibrated thresholds (conformal, abstention, anomaly, abnormal operating point); a
    cell outside ``typical_range`` of typicality (runtime/domain_alarm.py) is anomalous too."""
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2]
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
    sets = (1.0 - p) <= cal["conformal_threshold"]
    uncertain = p.max(1) < cal["abstention_threshold"]
    if typicality is None or typical_range is None:
        typicality, atypical = np.full(len(p), np.nan), np.zeros(len(p), bool)
    else:
        atypical = (typicality < typical_range[0]) | (typicality > typical_range[1])
    anomalous = (anomaly > cal["anomaly_threshold"]) | atypical
    p_abn = p[:, abnormal_mask].sum(1)
    abnormal = p_abn >= cal["abnormal_threshold"]
    return CellDecisions(p, p.argmax(1), entropy, top2[:, 0] - top2[:, 1], sets, p_abn, anomaly,
                         abnormal, uncertain, anomalous, typicality, atypical)
