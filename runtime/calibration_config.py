"""A bundle's ``calibration.json`` as one typed, read-only object, built and checked once, at load.

The calibration drives the race, the decisions, the heatmaps and the triage; a hand-edited or truncated
file must fail at load with the file and the first bad field named (as pydicom's validators do), not deep
in a run with a KeyError or a shape mismatch. The file's form is a JSON Schema
(runtime/schemas/calibration.schema.json, whose descriptions say what each field must be); what a schema
cannot say (lengths against the probes and the classes, timesteps inside the noise schedule) is checked
after it. Writers go through the same object, so a bundle cannot be written that fails to load.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.json_schema import describe_error, packaged_validator

FORMAT_VERSION = 1
SCHEMA_FILE = "schemas/calibration.schema.json"


@lru_cache(maxsize=None)
def _validator():
    return packaged_validator("cytoedge.runtime", SCHEMA_FILE)


def calibration_schema() -> dict:
    """The JSON Schema of calibration.json (package data)."""
    return _validator().schema


def _frozen(values: Any, ndim: int) -> np.ndarray:
    a = np.array(values, np.float64)
    if a.ndim != ndim:
        raise CalibrationError(f"expected a {ndim}-d array of numbers, got shape {a.shape}")
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Probe:
    """One measurement of the race: timestep, noise from the seeded bank, view (rotation, flip)."""

    timestep: int
    noise_index: int
    angle: float
    flip: bool

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Probe":
        return cls(int(d["timestep"]), int(d["noise_index"]), float(d["angle"]), bool(d["flip"]))

    def to_dict(self) -> dict:
        return {"timestep": self.timestep, "noise_index": self.noise_index, "angle": self.angle, "flip": self.flip}


@dataclass(frozen=True)
class AnomalyNormalisation:
    """Per-probe mean and std of known cells' anomaly value (runtime/decisions.anomaly_values)."""

    kind: str  # "null_ratio" (the network has a null class) or "leader_error"
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "mean", _frozen(self.mean, 1))
        object.__setattr__(self, "std", _frozen(self.std, 1))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AnomalyNormalisation":
        return cls(str(d["kind"]), d["mean"], d["std"])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "mean": self.mean.tolist(), "std": self.std.tolist()}


@dataclass(frozen=True)
class Thresholds:
    """The four calibrated operating points runtime/decisions.decide applies."""

    conformal: float  # a class is in the prediction set where 1 − p ≤ this
    abstention: float  # a call is uncertain below this top-class probability
    anomaly: float  # a cell is anomalous above this anomaly score
    abnormal: float  # a cell is flagged abnormal from this P(abnormal classes)


@dataclass(frozen=True)
class Calibration:
    """Everything calibration.json holds, typed. Arrays are read-only; ``to_dict`` gives the JSON back."""

    probes: tuple[Probe, ...]
    noise_seed: int
    noise_bank_size: int
    probe_weights: np.ndarray  # [M] > 0
    elimination_margins: np.ndarray  # [M]
    anomaly_normalisation: AnomalyNormalisation
    temperature: float
    thresholds: Thresholds
    settings: Mapping[str, Any]  # the fit's settings (calibration/fit.py DEFAULT_SETTINGS and overrides)
    fit_cells: Mapping[str, int]  # {"A": cells fitted on, "B": cells the thresholds were set on}
    provenance: Mapping[str, Any]
    temperature_by_depth: tuple[float, ...] | None = None
    class_offsets: np.ndarray | None = None  # [K, M], a site adaptation's
    labelled_classes: tuple[str, ...] | None = None  # a site adaptation's
    # a site adaptation's: the held part's confident-cell accuracy under each of settings.site_prevalences
    abstention_check: tuple[Mapping[str, Any], ...] | None = None
    triage: Mapping[str, Any] | None = None  # runtime/summary.TriagePolicy overrides

    def __post_init__(self):
        object.__setattr__(self, "probes", tuple(self.probes))
        object.__setattr__(self, "probe_weights", _frozen(self.probe_weights, 1))
        object.__setattr__(self, "elimination_margins", _frozen(self.elimination_margins, 1))
        if self.class_offsets is not None:
            object.__setattr__(self, "class_offsets", _frozen(self.class_offsets, 2))
        if self.temperature_by_depth is not None:
            object.__setattr__(self, "temperature_by_depth", tuple(float(t) for t in self.temperature_by_depth))
        if self.labelled_classes is not None:
            object.__setattr__(self, "labelled_classes", tuple(self.labelled_classes))
        if self.abstention_check is not None:
            object.__setattr__(self, "abstention_check", tuple(dict(c) for c in self.abstention_check))

    @classmethod
    def from_dict(cls, d: Any, class_count: int, timesteps: int, where: str) -> "Calibration":
        """Check ``d`` (parsed calibration.json) against the schema, then against ``class_count`` classes
        and a ``timesteps``-step schedule; raise CalibrationError naming ``where`` and the first bad field."""
        if not isinstance(d, dict):
            raise CalibrationError(f"{where}: a calibration is a JSON object, not {type(d).__name__}")
        error = next(iter(_validator().iter_errors(d)), None)
        if error is not None:
            raise CalibrationError(f"{where}: {describe_error(error, d, calibration_schema(), 'calibration', '; rerun `cytoedge calibrate`')}")
        _check_against_model(d, class_count, timesteps, where)
        thresholds = Thresholds(float(d["conformal_threshold"]), float(d["abstention_threshold"]),
                                float(d["anomaly_threshold"]), float(d["abnormal_threshold"]))
        return cls(
            probes=tuple(Probe.from_dict(p) for p in d["probes"]), noise_seed=d["noise_seed"],
            noise_bank_size=d["noise_bank_size"], probe_weights=d["probe_weights"],
            elimination_margins=d["elimination_margins"],
            anomaly_normalisation=AnomalyNormalisation.from_dict(d["anomaly_normalisation"]),
            temperature=float(d["temperature"]), thresholds=thresholds, settings=dict(d["settings"]),
            fit_cells=dict(d["fit_cells"]), provenance=dict(d["provenance"]),
            temperature_by_depth=d.get("temperature_by_depth"), class_offsets=d.get("class_offsets"),
            labelled_classes=d.get("labelled_classes"), abstention_check=d.get("abstention_check"),
            triage=d.get("triage"))

    def to_dict(self) -> dict:
        """The calibration.json document (its fields in the order the artefact writes them)."""
        t = self.thresholds
        doc: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "probes": [p.to_dict() for p in self.probes],
            "noise_seed": self.noise_seed,
            "noise_bank_size": self.noise_bank_size,
            "probe_weights": self.probe_weights.tolist(),
            "elimination_margins": self.elimination_margins.tolist(),
            "anomaly_normalisation": self.anomaly_normalisation.to_dict(),
            "temperature": self.temperature,
        }
        if self.temperature_by_depth is not None:
            doc["temperature_by_depth"] = list(self.temperature_by_depth)
        doc.update({"conformal_threshold": t.conformal, "abstention_threshold": t.abstention,
                    "anomaly_threshold": t.anomaly, "abnormal_threshold": t.abnormal,
                    "settings": dict(self.settings), "fit_cells": dict(self.fit_cells)})
        if self.class_offsets is not None:
            doc["class_offsets"] = self.class_offsets.tolist()
        if self.labelled_classes is not None:
            doc["labelled_classes"] = list(self.labelled_classes)
        if self.abstention_check is not None:
            doc["abstention_check"] = [dict(c) for c in self.abstention_check]
        if self.triage is not None:
            doc["triage"] = dict(self.triage)
        doc["provenance"] = dict(self.provenance)
        return doc


def _check_against_model(d: dict, class_count: int, timesteps: int, where: str) -> None:
    """What the schema cannot say: per-probe lengths, timesteps in the schedule, noises in the bank, one
    offset row per class."""
    n = len(d["probes"])
    for key, values in (("probe_weights", d["probe_weights"]), ("elimination_margins", d["elimination_margins"]),
                        ("anomaly_normalisation.mean", d["anomaly_normalisation"]["mean"]),
                        ("anomaly_normalisation.std", d["anomaly_normalisation"]["std"])):
        if len(values) != n:
            raise CalibrationError(f"{where}: field '{key}' has {len(values)} values for {n} probes")
    late = [p["timestep"] for p in d["probes"] if not 0 <= p["timestep"] < timesteps]
    if late:
        raise CalibrationError(f"{where}: probe timesteps {late} are outside the schedule's 0–{timesteps - 1}")
    beyond = [p["noise_index"] for p in d["probes"] if p["noise_index"] >= d["noise_bank_size"]]
    if beyond:
        raise CalibrationError(f"{where}: probe noise_index {beyond} are outside the noise bank's 0–"
                               f"{d['noise_bank_size'] - 1} (field 'noise_bank_size')")
    offsets = d.get("class_offsets")
    if offsets is not None:
        shape = f"'class_offsets' must be {class_count} rows (classes) of {n} numbers (probes)"
        if len(offsets) != class_count:
            raise CalibrationError(f"{where}: field {shape}; it has {len(offsets)} rows")
        for i, row in enumerate(offsets):
            if len(row) != n:
                raise CalibrationError(f"{where}: field 'class_offsets[{i}]' has {len(row)} values; {shape}")
