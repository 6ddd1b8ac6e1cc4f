"""A slide's red-cell reading: the share of each morphology class with its interval, the ICSH grade of
each feature, and what enters triage.

Pure over class counts and the red-cell bundle's grading artefact (``grading.json``, written by
calibration/icsh_grading.py with its provenance): a grade is read from the point estimate, as on a
manual count, each grade starting where the table says (``at_least`` or ``above`` a share: "5–20 /
21–50 / > 50" is 1+ from 5 %, 2+ above 20 %). The 95 % interval of each
share is the exact binomial (Clopper–Pearson) interval of the count. Fewer red cells than
``min_red_cells`` make the reading provisional, and it says so.
"""
from __future__ import annotations

from cytoedge.runtime.intervals import exact_interval

GRADES = ("0", "1+", "2+", "3+")


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


def red_cell_reading(counts: dict[str, int], grading: dict) -> dict:
    """The slide's red-cell block: counts, shares with intervals, grades, and the triage it asks for."""
    n = int(sum(counts.values()))
    by_class = {}
    for c, k in counts.items():
        lo, hi = exact_interval(int(k), n) if n else (0.0, 1.0)
        by_class[c] = {"count": int(k), "percent": round(100 * k / n, 3) if n else None,
                       "ci95_percent": [round(100 * lo, 3), round(100 * hi, 3)]}
    grades = {}
    for c, spec in grading["features"].items():
        k = int(counts.get(c, 0))
        p = 100 * k / n if n else 0.0
        grades[spec["feature"]] = {"class": c, "count": k, "percent": round(p, 3),
                                   "ci95_percent": by_class.get(c, {}).get("ci95_percent"),
                                   "grade": grade(p, k, spec["grade_starts_percent"]) if n else "not assessed"}
    provisional = n < grading["min_red_cells"]
    reasons, level = [], "routine"
    review_at = GRADES.index(grading["review_grade"])
    for feature, g in grades.items():
        if g["grade"] in GRADES and GRADES.index(g["grade"]) >= review_at:
            level = "review"
            reasons.append(f"{feature} {g['grade']} ({g['percent']:.1f} % of {n} red cells)")
    urgent = grading.get("urgent")
    if urgent and n:
        k = int(counts.get(urgent["class"], 0))
        if 100 * k / n > urgent["above_percent"]:
            lo, hi = by_class[urgent["class"]]["ci95_percent"]
            level = "urgent"
            reasons.insert(0, f"{urgent['class']}s {100 * k / n:.1f} % of {n} red cells (95 % CI {lo:.1f}–{hi:.1f} %): "
                              f"above {urgent['above_percent']:g} %, the ICSH threshold for suspecting a "
                              "thrombotic microangiopathy")
    if provisional:
        reasons.append(f"only {n} red cells classified (grading needs {grading['min_red_cells']}): provisional")
    return {"red_cells_classified": n, "provisional": provisional, "by_class": by_class, "grades": grades,
            "triage": {"level": level, "reasons": reasons}}
