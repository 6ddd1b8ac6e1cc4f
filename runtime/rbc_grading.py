"""A slide's red-cell reading: the share of each morphology class with its interval, the ICSH grade of
each feature, and what enters triage.

Pure over class counts, the cells' calibrated probabilities and the red-cell bundle's grading artefact
(``grading.json``, written by calibration/icsh_grading.py with its provenance): a grade is read from the
point estimate, as on a manual count, each grade starting where the table says (``at_least`` or
``above`` a share: "5–20 / 21–50 / > 50" is 1+ from 5 %, 2+ above 20 %). The 95 % interval of each
called share is the exact binomial (Clopper–Pearson) interval of the count. Fewer red cells than
``min_red_cells`` make the reading provisional, and it says so.

Where the artefact asks for it (``share_estimate``), the grades and the schistocyte urgency are read
from the shares corrected for the model's confusions (runtime/prior_shift.py), with a bootstrap
interval; the called shares stay beside them. A slide whose called schistocytes pass the urgent
threshold while the corrected share does not is still sent to review, with both figures: the correction
never hides a call.
"""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.intervals import exact_interval
from cytoedge.runtime.prior_shift import shares_with_interval

GRADES = ("0", "1+", "2+", "3+")


def _number(value, where: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"field '{where}' is {value!r}; it must be a number in [{low:g}, {high:g}]")


def check_grading(doc, class_names: list[str]) -> None:
    """Raise ValueError naming the first field of a grading artefact that a reading could not use."""
    if not isinstance(doc, dict) or doc.get("format_version") != 1:
        raise ValueError("field 'format_version' must be 1")
    features = doc.get("features")
    if not isinstance(features, dict):
        raise ValueError("field 'features' must be an object of class -> {feature, grade_starts_percent}")
    for c, spec in features.items():
        if c not in class_names:
            raise ValueError(f"field 'features.{c}' names a class the bundle does not have")
        if not (isinstance(spec, dict) and isinstance(spec.get("feature"), str)
                and isinstance(spec.get("grade_starts_percent"), dict)):
            raise ValueError(f"field 'features.{c}' needs 'feature' (text) and 'grade_starts_percent'")
        starts = spec["grade_starts_percent"]
        for g in ("1+", "2+", "3+"):
            start = starts.get(g)
            if not isinstance(start, dict) or len(start) != 1 or next(iter(start)) not in ("at_least", "above"):
                raise ValueError(f"field 'features.{c}.grade_starts_percent.{g}' must be {{\"at_least\" or \"above\": %}}")
            _number(next(iter(start.values())), f"features.{c}.grade_starts_percent.{g}", 0, 100)
    if doc.get("review_grade") not in ("1+", "2+", "3+"):
        raise ValueError(f"field 'review_grade' is {doc.get('review_grade')!r}; it must be 1+, 2+ or 3+")
    if isinstance(doc.get("min_red_cells"), bool) or not isinstance(doc.get("min_red_cells"), int) or doc["min_red_cells"] < 1:
        raise ValueError("field 'min_red_cells' must be a positive whole number")
    urgent = doc.get("urgent")
    if urgent is not None:
        if not isinstance(urgent, dict) or urgent.get("class") not in class_names:
            raise ValueError("field 'urgent.class' must name one of the bundle's classes")
        _number(urgent.get("above_percent"), "urgent.above_percent", 0, 100)
    estimate = doc.get("share_estimate")
    if estimate is not None:
        interval = estimate.get("interval") if isinstance(estimate, dict) else None
        if not isinstance(interval, dict):
            raise ValueError("field 'share_estimate.interval' must be {bootstrap_resamples, level, seed}")
        n = interval.get("bootstrap_resamples")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10000:
            raise ValueError(f"field 'share_estimate.interval.bootstrap_resamples' is {n!r}; it must be 1-10000")
        _number(interval.get("level"), "share_estimate.interval.level", 0.5, 0.999)
        if isinstance(interval.get("seed"), bool) or not isinstance(interval.get("seed"), int):
            raise ValueError("field 'share_estimate.interval.seed' must be a whole number")


def _reaches(percent: float, start: dict) -> bool:
    return percent >= start["at_least"] if "at_least" in start else percent > start["above"]


def grade(percent: float, count: int, starts: dict) -> str:
    """The ICSH grade of one feature's share (``starts``: grade → {"at_least" or "above": %})."""
    if count == 0:
        return "0"
    for g in ("3+", "2+", "1+"):
        if _reaches(percent, starts[g]):
            return g
    return "0"


def _adjusted(names: list[str], probabilities: np.ndarray | None, estimate: dict | None) -> dict | None:
    """Each class's corrected share and its interval, in %, or None where they cannot be had."""
    if not estimate or probabilities is None or not len(probabilities):
        return None
    p = np.asarray(probabilities, np.float64)
    if p.shape[1] != len(names):
        raise ValueError(f"red-cell probabilities have {p.shape[1]} classes; the counts have {len(names)}")
    interval = estimate["interval"]
    shares, lo, hi = shares_with_interval(p, resamples=interval["bootstrap_resamples"], level=interval["level"],
                                          seed=interval["seed"])
    return {c: (100 * shares[i], [round(100 * lo[i], 3), round(100 * hi[i], 3)]) for i, c in enumerate(names)}


def red_cell_reading(counts: dict[str, int], grading: dict, probabilities: np.ndarray | None = None) -> dict:
    """The slide's red-cell block: counts, shares with intervals, grades, and the triage it asks for.

    ``probabilities``: the classified cells' calibrated probabilities ``[cells, classes]``, columns in the
    order of ``counts``; without them (or without ``share_estimate`` in ``grading``) the grades are read
    from the called counts.
    """
    n = int(sum(counts.values()))
    if probabilities is not None and len(probabilities) != n:
        raise ValueError(f"probabilities of {len(probabilities)} cells for counts of {n}")
    adjusted = _adjusted(list(counts), probabilities, grading.get("share_estimate"))
    by_class = {}
    for c, k in counts.items():
        lo, hi = exact_interval(int(k), n) if n else (0.0, 1.0)
        by_class[c] = {"count": int(k), "percent": round(100 * k / n, 3) if n else None,
                       "ci95_percent": [round(100 * lo, 3), round(100 * hi, 3)]}
        if adjusted:
            by_class[c].update(adjusted_percent=round(adjusted[c][0], 3), adjusted_ci95_percent=adjusted[c][1])
    grades = {}
    for c, spec in grading["features"].items():
        k = int(counts.get(c, 0))
        p = 100 * k / n if n else 0.0
        g = {"class": c, "count": k, "percent": round(p, 3), "ci95_percent": by_class.get(c, {}).get("ci95_percent")}
        graded_p, graded_k = p, k
        if adjusted:
            graded_p = adjusted[c][0]
            graded_k = int(round(graded_p * n / 100))  # under half a cell of this sample grades 0
            g.update(adjusted_percent=round(graded_p, 3), adjusted_ci95_percent=adjusted[c][1])
        g["grade"] = grade(graded_p, graded_k, spec["grade_starts_percent"]) if n else "not assessed"
        grades[spec["feature"]] = g
    provisional = n < grading["min_red_cells"]
    reasons, level = [], "routine"
    review_at = GRADES.index(grading["review_grade"])
    corrected = ", corrected for the model's confusions" if adjusted else ""
    for feature, g in grades.items():
        if g["grade"] in GRADES and GRADES.index(g["grade"]) >= review_at:
            level = "review"
            reasons.append(f"{feature} {g['grade']} ({g.get('adjusted_percent', g['percent']):.1f} % of {n} red cells"
                           f"{corrected})")
    urgent = grading.get("urgent")
    if urgent and n:
        c, limit = urgent["class"], urgent["above_percent"]
        called = 100 * int(counts.get(c, 0)) / n
        lo, hi = by_class[c]["ci95_percent"]
        why = f"above {limit:g} %, the ICSH threshold for suspecting a thrombotic microangiopathy"
        if adjusted is None and called > limit:
            level = "urgent"
            reasons.insert(0, f"{c}s {called:.1f} % of {n} red cells (95 % CI {lo:.1f}–{hi:.1f} %): {why}")
        elif adjusted is not None:
            share, (alo, ahi) = adjusted[c]
            if share > limit:
                level = "urgent"
                reasons.insert(0, f"{c}s {share:.1f} % of {n} red cells, corrected for the model's confusions "
                                  f"(95 % CI {alo:.1f}–{ahi:.1f} %; called on {called:.1f} %): {why}")
            elif called > limit:
                level = "review" if level == "routine" else level
                reasons.insert(0, f"{c}s called on {called:.1f} % of {n} red cells, {why}, but {share:.1f} % once "
                                  f"corrected for the model's confusions (95 % CI {alo:.1f}–{ahi:.1f} %): "
                                  f"review the {c} calls")
    if provisional:
        reasons.append(f"only {n} red cells classified (grading needs {grading['min_red_cells']}): provisional")
    return {"red_cells_classified": n, "provisional": provisional,
            "shares": "corrected for the model's confusions (EM prior adjustment), bootstrap 95 % interval"
            if adjusted else "called counts",
            "by_class": by_class, "grades": grades, "triage": {"level": level, "reasons": reasons}}
