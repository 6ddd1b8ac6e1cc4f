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
    anomalous: np.ndarray


def concat_decisions(parts: list[CellDecisions]) -> CellDecisions:
    """Join the decisions of consecutive batches into one."""
    from dataclasses import fields

    return CellDecisions(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(CellDecisions)})


def anomaly_scores(leader_weighted_errors: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Mean z-score of the winning class's weighted errors over the probes it ran (NaN = not run).

    A cell no known class explains leaves a large error even under its best class.
    """
    z = (leader_weighted_errors - mean[None, :]) / std[None, :]
    return np.nanmean(z, axis=1)


def decide(p: np.ndarray, anomaly: np.ndarray, abnormal_mask: np.ndarray, cal: dict) -> CellDecisions:
    """Apply the calibrated thresholds (conformal, abstention, anomaly, abnormal operating point)."""
    top2 = np.sort(p, axis=1)[:, ::-1][:, :2]
    entropy = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(1)
    sets = (1.0 - p) <= cal["conformal_threshold"]
    uncertain = p.max(1) < cal["abstention_threshold"]
    anomalous = anomaly > cal["anomaly_threshold"]
    p_abn = p[:, abnormal_mask].sum(1)
    abnormal = p_abn >= cal["abnormal_threshold"]
    return CellDecisions(p, p.argmax(1), entropy, top2[:, 0] - top2[:, 1], sets, p_abn, anomaly,
                         abnormal, uncertain, anomalous)
