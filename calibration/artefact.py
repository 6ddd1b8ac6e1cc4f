"""The calibration artefact: candidate probes, and writing a fitted calibration into a bundle."""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest
from cytoedge.runtime.estimator import Probe

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 1

DEFAULT_CANDIDATES = {
    "timesteps": [30, 100, 200, 300, 400, 500, 650, 800],
    "replicas": 2,
    "noise_seed": 20251123,
}


def candidate_probes(timesteps: list[int], replicas: int) -> list[Probe]:
    """Each replica pairs every timestep with its own noise and its own view (quarter turn, flip)."""
    probes = []
    for r in range(replicas):
        for i, t in enumerate(timesteps):
            probes.append(Probe(int(t), r * len(timesteps) + i, float(r * np.pi / 2), bool(r % 2)))
    return probes


def write_calibration(bundle: ModelBundle, fitted: dict, candidates: list[Probe], noise_seed: int,
                      provenance: dict) -> Path:
    """Store the fitted calibration in the bundle and re-hash its manifest; returns the file written."""
    chosen = [candidates[i] for i in fitted["chosen_candidates"]]
    doc = {
        "format_version": CALIBRATION_FORMAT,
        "probes": [p.to_dict() for p in chosen],
        "noise_seed": noise_seed,
        "noise_bank_size": len(candidates),
        **{k: v for k, v in fitted.items() if k != "chosen_candidates"},
        "provenance": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "model_sha256_before": bundle.sha256, **provenance},
    }
    path = bundle.path / CALIBRATION_FILE
    path.write_text(json.dumps(doc, indent=2) + "\n")
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    manifest["calibration"] = CALIBRATION_FILE
    manifest["files"][CALIBRATION_FILE] = {"sha256": ""}
    write_manifest(bundle.path, manifest)
    log.info("wrote %s (%d probes)", path, len(chosen))
    return path
