"""The result document as JSON and the cells as CSV (one row per cell)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CSV_COLUMNS = ("id", "source", "field", "x0", "y0", "x1", "y1", "cx", "cy", "class", "probability", "runner_up",
               "abnormal", "uncertain", "anomalous", "anomaly_score", "entropy", "margin", "prediction_set", "nfe",
               "estimator", "model", "bundle_sha256", "cytoedge_version")


def write_json(document: dict, path: Path) -> Path:
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")
    return path


def cell_rows(source: str, cells: list[dict]) -> list[dict]:
    rows = []
    for c in cells:
        probs = c.get("probabilities") or {}
        unc = c.get("uncertainty") or {}
        audit = c.get("audit", {})
        rows.append({
            "id": c["id"], "source": source, "field": c.get("field", ""),
            "x0": c["bbox"][0], "y0": c["bbox"][1], "x1": c["bbox"][2], "y1": c["bbox"][3],
            "cx": c["centre"][0], "cy": c["centre"][1], "class": c["class"],
            "probability": probs.get(c["class"], ""), "runner_up": c.get("runner_up", ""),
            "abnormal": int(c["flags"]["abnormal"]), "uncertain": int(c["flags"]["uncertain"]),
            "anomalous": "" if c["flags"]["anomalous"] is None else int(c["flags"]["anomalous"]),  # "": not assessed
            "anomaly_score": "" if c.get("anomaly_score") is None else c["anomaly_score"],
            "entropy": unc.get("entropy", ""), "margin": unc.get("margin", ""),
            "prediction_set": "|".join(c.get("prediction_set") or []), "nfe": c.get("nfe", 0),
            "estimator": c.get("estimator") or "", "model": audit.get("model", ""),
            "bundle_sha256": audit.get("bundle_sha256", ""), "cytoedge_version": audit.get("cytoedge_version", ""),
        })
    return rows


def write_csv(source: str, cells: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(cell_rows(source, cells))
    return path
