"""The result document: the versioned JSON every command and the service emit for scored slides.

One shape for ``score --json``, ``submit --json`` and the service's results (docs/results-format.md,
docs/schemas/result-document.schema.json): a record per cell in one form whatever estimator made it
(keys an estimator does not give are derived and say so), a slide entry (cells and summary, or an
error), and the audit block that names what decided the numbers.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.classify_cells import mark_unreliable

RESULT_FORMAT = "cytoedge-result"
RESULT_FORMAT_VERSION = 1


def estimator_settings(bundle: ModelBundle, estimator: str) -> dict:
    """What decides a cell's numbers besides the network: the calibration (fast) or the protocol (reference)."""
    if estimator == "reference":
        from cytoedge.runtime.reference_estimator import ReferenceSettings

        return {"name": "reference", **asdict(ReferenceSettings())}
    cal = bundle.calibration
    doc = cal.to_dict() if cal is not None else {}  # the file's JSON: its sha256 is the same for the same file
    return {"name": estimator,
            "calibration_sha256": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(),
            "calibration_date": cal.provenance.get("date") if cal is not None else None,
            "probes": len(cal.probes) if cal is not None else 0,
            "temperature": cal.temperature if cal is not None else None}


def run_audit(bundle: ModelBundle, backend: DenoiserBackend, estimator: str) -> dict:
    """What decided a run's numbers: software, exact bundle, backend, estimator and its settings."""
    from cytoedge.runtime import __version__

    return {"cytoedge_version": __version__, "model": bundle.name, "bundle_sha256": bundle.sha256,
            "backend": backend.name, "estimator": estimator, "estimator_settings": estimator_settings(bundle, estimator)}


def cell_record(res: dict, bundle: ModelBundle) -> dict:
    """The estimator's record in the document's shape; keys an estimator does not give are derived
    (and say so) rather than invented: see docs/results-format.md."""
    names = bundle.class_names
    cls = res["class"]
    probs = res.get("probabilities")
    if probs:
        ranked = sorted(probs, key=lambda c: -probs[c])
    else:
        scores = res.get("scores", {})
        ranked = sorted(scores, key=lambda c: scores[c]) if scores else [cls]
    runner_up = next((c for c in ranked if c != cls), next(c for c in names if c != cls))
    flags = dict(res.get("flags") or {})
    flags.setdefault("abnormal", cls in bundle.abnormal_classes)
    flags.setdefault("uncertain", len(res.get("survived", [cls])) > 1 if "survived" in res else False)
    flags.setdefault("anomalous", None)  # not assessed: the estimator gave no anomaly score (reference)
    out = {
        "class": cls,
        "runner_up": runner_up,
        "probabilities": {c: round(float(p), 6) for c, p in probs.items()} if probs else None,
        "flags": {k: None if v is None else bool(v) for k, v in flags.items()},
        "anomaly_score": res.get("anomaly_score"),
        "typicality": res.get("typicality"),
        "uncertainty": res.get("uncertainty"),
        "prediction_set": res.get("prediction_set") or res.get("survived") or [cls],
        "nfe": int(res.get("nfe", 0)),
        "estimator": res.get("estimator"),
    }
    extra = {k: v for k, v in res.items() if k not in out and k not in ("survived",)}
    if extra:
        out["estimator_detail"] = extra
    return out


def slide_entry(source: str, records: list[dict], summary: dict | None, error: str | None = None) -> dict:
    """One slide of the document: its cells and summary, or its error (with the summary if any).
    Under a raised out-of-domain alarm (the summary's) no cell is labelled confident."""
    mark_unreliable(records, (summary or {}).get("domain_alarm"))
    if error is not None:
        entry = {"source": source, "status": "error", "error": error}
        if summary is not None:
            entry["summary"] = summary
        return entry
    return {"source": source, "status": "ok", "summary": summary, "cells": records}


def build_result_document(records: list[dict], summary: dict, meta: dict) -> dict:
    """The versioned document for one slide. ``meta``: the scorer's ``audit`` plus "source" and,
    optionally, "error" and "run" (timings, time: the only part that differs between two runs)."""
    entry = slide_entry(meta.get("source", summary.get("source", "")), records, summary, meta.get("error"))
    audit = {k: v for k, v in meta.items() if k not in ("source", "error", "run")}
    return build_slides_document([entry], audit, meta.get("run", {}))


def build_slides_document(slides: list[dict], audit: dict, run: dict) -> dict:
    """The versioned document for several slides (entries from :func:`slide_entry`)."""
    return {"format": RESULT_FORMAT, "format_version": RESULT_FORMAT_VERSION, **audit, "run": run,
            "slides": [{**s, "audit": audit} for s in slides]}
