"""The calibration artefact: candidate probes, and writing a fitted calibration into a bundle."""
from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest
from cytoedge.runtime.calibration_config import FORMAT_VERSION, Calibration, Probe

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"

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


def fitted_calibration(fitted: dict, candidates: list[Probe], noise_seed: int, provenance: dict, class_count: int,
                       timesteps: int, where: str) -> Calibration:
    """The checked calibration of a fit (calibration/fit.fit_calibration), whose chosen probes index
    ``candidates``, drawn from a bank of one noise per candidate seeded ``noise_seed``."""
    doc = {
        "format_version": FORMAT_VERSION,
        "probes": [candidates[i].to_dict() for i in fitted["chosen_candidates"]],
        "noise_seed": noise_seed,
        "noise_bank_size": len(candidates),
        **{k: v for k, v in fitted.items() if k != "chosen_candidates"},
        "provenance": provenance,
    }
    return Calibration.from_dict(doc, class_count, timesteps, where)


def write_calibration(bundle: ModelBundle, fitted: dict, candidates: list[Probe], noise_seed: int,
                      provenance: dict) -> Path:
    """Store the fitted calibration in the bundle and re-hash its manifest; returns the file written.

    The document is checked as loading checks it (runtime/calibration_config.py) before anything is
    written, so a bundle is never left with a calibration it refuses."""
    path = bundle.path / CALIBRATION_FILE
    provenance = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "model_sha256_before": bundle.sha256, **provenance}
    calibration = fitted_calibration(fitted, candidates, noise_seed, provenance, len(bundle.class_names),
                                     bundle.schedule.num_train_timesteps, str(path))
    path.write_text(json.dumps(calibration.to_dict(), indent=2) + "\n")
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    manifest["calibration"] = CALIBRATION_FILE
    manifest["files"][CALIBRATION_FILE] = {"sha256": ""}
    write_manifest(bundle.path, manifest)
    log.info("wrote %s (%d probes)", path, len(calibration.probes))
    return path
