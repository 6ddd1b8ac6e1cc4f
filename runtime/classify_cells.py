"""Where a cell's class is decided: run the chosen estimator and turn its numbers into records."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.errors import CytoedgeError

ESTIMATORS = ("fast", "reference")


def classify_batch(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, estimator: str = "fast") -> list[dict]:
    """One JSON-ready record per cell: class, per-class scores, NFE (and, when calibrated, probabilities)."""
    if estimator not in ESTIMATORS:
        raise CytoedgeError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if estimator == "reference":
        return _reference_records(batch, bundle, backend)
    raise CytoedgeError("the fast estimator is not available yet; use --estimator reference")


def _reference_records(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend) -> list[dict]:
    from cytoedge.runtime.reference_estimator import classify_reference

    res = classify_reference(batch, bundle, backend)
    names = bundle.class_names
    records = []
    for i in range(len(batch)):
        records.append({
            "class": names[int(res.class_id[i])],
            "scores": {n: round(float(e), 6) for n, e in zip(names, res.mean_error[i])},
            "score_kind": "mean masked denoising error (lower = better fit)",
            "survived": [n for n, s in zip(names, res.survived[i]) if s],
            "confidence_label": "uncalibrated",
            "nfe": int(res.nfe[i]),
            "estimator": "reference",
        })
    return records
