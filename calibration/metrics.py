"""Classification, agreement and calibration metrics, pure numpy (probabilities ``[N,K]``, labels ``[N]``;
scipy.stats only for the exact binomial interval)."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.intervals import exact_interval


def confusion_matrix(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def per_class_recall(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = confusion_matrix(y, pred, k)
    support = cm.sum(1)
    return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(np.nanmean(per_class_recall(y, pred, k)))


def per_class_specificity(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """One class against the rest: of the cells whose true class is not c, the share not called c
    (NaN where every cell is of class c)."""
    cm = confusion_matrix(y, pred, k)
    negatives = cm.sum() - cm.sum(1)
    false_positives = cm.sum(0) - np.diag(cm)
    return np.where(negatives > 0, (negatives - false_positives) / np.maximum(negatives, 1), np.nan)


def cohens_kappa(cm: np.ndarray) -> tuple[float, float]:
    """Cohen's unweighted κ of a square table of two raters' counts (rows one rater, columns the other)
    and its large-sample standard error (Fleiss, Cohen & Everitt 1969: the non-null variance, SAS PROC
    FREQ's ASE). Both NaN where κ is undefined: no cells, or chance agreement 1 (both raters used one
    and the same class throughout)."""
    cm = np.asarray(cm, np.float64)
    n = cm.sum()
    if n == 0:
        return float("nan"), float("nan")
    p = cm / n
    rows, cols = p.sum(1), p.sum(0)
    observed, chance = float(np.trace(p)), float(rows @ cols)
    if chance >= 1.0:
        return float("nan"), float("nan")
    kappa = (observed - chance) / (1.0 - chance)
    diagonal = float(np.sum(np.diag(p) * (1.0 - (rows + cols) * (1.0 - kappa)) ** 2))
    off = p * (cols[:, None] + rows[None, :]) ** 2  # p_ij (p_.i + p_j.)^2
    np.fill_diagonal(off, 0.0)
    variance = (diagonal + (1.0 - kappa) ** 2 * float(off.sum()) - (kappa - chance * (1.0 - kappa)) ** 2) \
        / ((1.0 - chance) ** 2 * n)
    return float(kappa), float(np.sqrt(max(variance, 0.0)))


def rumke_interval(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The limits of Rümke's table that CLSI H20-A2 gives for a differential count: the exact binomial
    interval (runtime/intervals.py), as fractions; NaN for n = 0."""
    return exact_interval(count, n, level)


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-class confidence over equal-width bins (Guo et al. 2017)."""
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reliability_table(p: np.ndarray, y: np.ndarray, bins: int = 15) -> list[dict]:
    conf, correct = p.max(1), (p.argmax(1) == y)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    return [{"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int((idx == b).sum()),
             "confidence": float(conf[idx == b].mean()) if (idx == b).any() else None,
             "accuracy": float(correct[idx == b].mean()) if (idx == b).any() else None} for b in range(bins)]


def brier_score(p: np.ndarray, y: np.ndarray) -> float:
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(1).mean())


def nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def risk_coverage(p: np.ndarray, y: np.ndarray, points: int = 21) -> list[dict]:
    """Error rate among the most confident cells as coverage shrinks (selective classification)."""
    order = np.argsort(-p.max(1), kind="stable")
    wrong = (p.argmax(1) != y)[order]
    out = []
    for cov in np.linspace(1.0, 0.05, points):
        n = max(1, int(round(cov * len(y))))
        out.append({"coverage": round(float(cov), 3), "risk": float(wrong[:n].mean()),
                    "threshold": float(p.max(1)[order][n - 1])})
    return out


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (rank form, ties averaged); NaN if a class is absent."""
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sensitivity_specificity(flag: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    positive, flag = positive.astype(bool), flag.astype(bool)
    sens = float(flag[positive].mean()) if positive.any() else float("nan")
    spec = float((~flag[~positive]).mean()) if (~positive).any() else float("nan")
    return sens, spec


def specificity_at_sensitivity(score: np.ndarray, positive: np.ndarray, target: float) -> dict:
    """The best any threshold on ``score`` (flag = score ≥ threshold) does: the highest threshold that
    flags at least ``target`` of the positives, and the specificity it leaves. What a model can give an
    abnormal-cell screen, whatever operating point calibration picks."""
    positive = positive.astype(bool)
    if not positive.any() or positive.all():
        return {"target_sensitivity": target, "threshold": None, "sensitivity": float("nan"),
                "specificity": float("nan")}
    pos = np.sort(score[positive])
    threshold = float(pos[int(np.floor((1.0 - target) * len(pos) + 1e-9))])
    sens, spec = sensitivity_specificity(score >= threshold, positive)
    return {"target_sensitivity": target, "threshold": threshold, "sensitivity": sens, "specificity": spec}
