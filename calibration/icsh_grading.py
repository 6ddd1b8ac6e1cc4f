"""The ICSH 2015 red-cell grading table, as a bundle artefact (``grading.json`` of a red-cell bundle).

Haematologists grade each red-cell feature 1+ / 2+ / 3+ by its share of red cells (Palmer et al.,
"ICSH recommendations for the standardization of nomenclature and grading of peripheral blood cell
morphological features", Int J Lab Hematol 2015;37:287–303). The limits differ by feature: size and
colour features (macrocytes, microcytes, hypochromic cells) start at 11 %, most poikilocytes at 5 %,
schistocytes at any count. Schistocytes above 1 % of red cells are the ICSH's threshold for suspecting
a thrombotic microangiopathy (Zini et al., ICSH 2012; 2021 update, Int J Lab Hematol 2021;43:1264–71):
that one enters triage as urgent.

The limits below were transcribed for this project from the publications named; a lab verifies them
against its own copy of the guideline (and may replace them: the table is data in the bundle, with its
provenance, not code). A model class maps to one ICSH feature; a class with no feature (normal,
uncategorised) is not graded.
"""
from __future__ import annotations

import json
from pathlib import Path

GRADING_FILE = "grading.json"
ICSH_2015 = "Palmer L, et al. Int J Lab Hematol 2015;37:287-303 (ICSH grading of peripheral blood cell morphology)"
ICSH_SCHISTOCYTES = ("Zini G, et al. Int J Lab Hematol 2012;34:107-16, and the 2021 update, Int J Lab Hematol "
                     "2021;43:1264-71: > 1 % schistocytes in adults is suspicious for thrombotic microangiopathy")

SHARE_ESTIMATE_PROVENANCE = (
    "Saerens M, Latinne P, Decaestecker C. Neural Comput 2002;14:21-41 (EM re-estimate of class priors). Chosen "
    "by measurement on the held-out Chula fields (benchmarks/bench_rbc_model.py, 2026-12-04, cytoedge-rbc32-ddpm "
    "at 10,600 steps): per-field grade agreement 85.6 % from called counts, 88.2 % corrected; on 1,000-cell slides "
    "resampled from held-out cells, slides of 30 % microcytes and no schistocytes urgent 94 % of the time from "
    "called counts, 4 % corrected, and slides of 2 % schistocytes urgent 100 % / 78 % (the rest sent to review); "
    "RESULTS.md, 'Red-cell morphology bundle'")

# Where each grade starts, in % of red cells, as the published ranges read on a continuous share:
# "5-20 / 21-50 / > 50" is 1+ from 5 %, 2+ above 20 %, 3+ above 50 %; schistocytes' "< 1 / 1-2 / > 2" is
# 1+ from one cell, 2+ from 1 %, 3+ above 2 %.
SIZE_COLOUR = {"1+": {"at_least": 11.0}, "2+": {"above": 20.0}, "3+": {"above": 50.0}}
POIKILOCYTE = {"1+": {"at_least": 5.0}, "2+": {"above": 20.0}, "3+": {"above": 50.0}}
SCHISTOCYTE = {"1+": {"above": 0.0}, "2+": {"at_least": 1.0}, "3+": {"above": 2.0}}

# model class -> (ICSH feature, where its grades start)
RBC12_FEATURES = {
    "macrocyte": ("macrocytes", SIZE_COLOUR),
    "microcyte": ("microcytes", SIZE_COLOUR),
    "hypochromia": ("hypochromic cells", SIZE_COLOUR),
    "spherocyte": ("spherocytes", POIKILOCYTE),
    "target_cell": ("target cells", POIKILOCYTE),
    "stomatocyte": ("stomatocytes", POIKILOCYTE),
    "ovalocyte": ("ovalocytes", POIKILOCYTE),
    "elliptocyte": ("elliptocytes", POIKILOCYTE),
    "teardrop": ("teardrop cells (dacrocytes)", POIKILOCYTE),
    "burr_cell": ("echinocytes (burr cells)", POIKILOCYTE),
    "schistocyte": ("schistocytes", SCHISTOCYTE),
}


def icsh_grading(class_names: list[str]) -> dict:
    """The grading artefact for a bundle with ``class_names`` (features of classes it lacks are left out)."""
    features = {c: {"feature": f, "grade_starts_percent": starts} for c, (f, starts) in RBC12_FEATURES.items()
                if c in class_names}
    return {
        "format_version": 1,
        "features": features,
        # A feature at or above this grade makes the slide "review"; schistocytes above this share make it urgent.
        "review_grade": "2+",
        "urgent": {"class": "schistocyte", "above_percent": 1.0, "provenance": ICSH_SCHISTOCYTES}
        if "schistocyte" in class_names else None,
        # Grades from fewer red cells than this are reported as provisional (ICSH: count at least 1,000).
        "min_red_cells": 1000,
        # Shares are read corrected for the model's confusions (calibration/prior_shift.py), not as called.
        "share_estimate": {"method": "EM prior adjustment of the calibrated probabilities (uniform calibration prior)",
                           "interval": {"bootstrap_resamples": 200, "level": 0.95, "seed": 0},
                           "provenance": SHARE_ESTIMATE_PROVENANCE},
        "provenance": {"grading": ICSH_2015, "schistocytes": ICSH_SCHISTOCYTES,
                       "note": "transcribed for cytoedge; verify against the published tables before clinical use; "
                               "a grade is read from the point estimate, as on a manual count",
                       "writer": "calibration/icsh_grading.py"},
    }


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
        starts = spec.get("grade_starts_percent") if isinstance(spec, dict) else None
        if not isinstance(spec.get("feature") if isinstance(spec, dict) else None, str) or not isinstance(starts, dict):
            raise ValueError(f"field 'features.{c}' needs 'feature' (text) and 'grade_starts_percent'")
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


def write_grading(bundle) -> Path:
    """Write ``grading.json`` (for the bundle's classes) into a bundle and list it in the manifest."""
    from cytoedge.runtime.bundle import write_manifest

    path = Path(bundle.path) / GRADING_FILE
    path.write_text(json.dumps(icsh_grading(bundle.class_names), indent=1) + "\n")
    manifest = bundle.manifest
    manifest["grading"] = GRADING_FILE
    manifest["files"][GRADING_FILE] = {"sha256": ""}
    write_manifest(bundle.path, manifest)
    return path
