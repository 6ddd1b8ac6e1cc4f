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
        # Shares are read corrected for the model's confusions (runtime/prior_shift.py), not as called.
        "share_estimate": {"method": "EM prior adjustment of the calibrated probabilities (uniform calibration prior)",
                           "interval": {"bootstrap_resamples": 200, "level": 0.95, "seed": 0},
                           "provenance": SHARE_ESTIMATE_PROVENANCE},
        "provenance": {"grading": ICSH_2015, "schistocytes": ICSH_SCHISTOCYTES,
                       "note": "transcribed for cytoedge; verify against the published tables before clinical use; "
                               "a grade is read from the point estimate, as on a manual count",
                       "writer": "calibration/icsh_grading.py"},
    }


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
