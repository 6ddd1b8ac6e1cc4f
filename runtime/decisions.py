"""From calibrated numbers to per-cell decisions: uncertainty, prediction sets, anomaly, flags.

Pure numpy; the thresholds come from the bundle's calibration (runtime/calibration_config.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cytoedge.runtime.calibration_config import AnomalyNormalisation, Thresholds


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
                   normalisation: AnomalyNormalisation) -> np.ndarray:
    """Mean over the probes a cell ran of the z-scored anomaly value (``anomaly_values``), with the
    per-probe mean/std of known cells from the calibration."""
    if (normalisation.kind == "null_ratio") != (null_weighted_errors is not None):
        raise ValueError(f"anomaly normalisation is {normalisation.kind!r} but the race "
                         f"{'did not measure' if normalisation.kind == 'null_ratio' else 'measured'} "
                         "null-class errors; recalibrate the bundle (`cytoedge calibrate`)")
    values = anomaly_values(leader_weighted_errors, null_weighted_errors)
    z = (values - normalisation.mean[None, :]) / normalisation.std[None, :]
    return np.nanmean(z, axis=1)


def cell_temperatures(depth: np.ndarray, temperature: float, by_depth: Sequence[float] | None = None) -> np.ndarray:
    """Each cell's temperature: by how many probes its race ran (``by_depth``, the last entry for that
    depth and deeper), else the single calibrated ``temperature``."""
    if not by_depth:
        return np.full(len(depth), float(temperature))
    return np.asarray(by_depth, np.float64)[np.clip(np.asarray(depth) - 1, 0, len(by_depth) - 1)]


def decide(p: np.ndarray, anomaly: np.ndarray, abnormal_mask: np.ndarray, thresholds: Thresholds,
           typicality: np.ndarray | None = None, typical_range: tuple[float, float] | None = None) -> CellDecisions:
    """Apply the calibrated thresholds (conformal, abstention, anomaly, abnormal operating point); a
    cell outside ``typical_range`` of typicality (runtime/domain_alarm.py) is anomalous too."""
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2]
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
    sets = (1.0 - p) <= thresholds.conformal
    uncertain = p.max(1) < thresholds.abstention
    if typicality is None or typical_range is None:
        typicality, atypical = np.full(len(p), np.nan), np.zeros(len(p), bool)
    else:
        atypical = (typicality < typical_range[0]) | (typicality > typical_range[1])
    anomalous = (anomaly > thresholds.anomaly) | atypical
    p_abn = p[:, abnormal_mask].sum(1)
    abnormal = p_abn >= thresholds.abnormal
    return CellDecisions(p, p.argmax(1), entropy, top2[:, 0] - top2[:, 1], sets, p_abn, anomaly,
                         abnormal, uncertain, anomalous, typicality, atypical)
