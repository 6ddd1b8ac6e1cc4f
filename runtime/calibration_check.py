"""Validation of a bundle's ``calibration.json`` when the bundle is loaded, in the manner of pydicom's
validators: one table of (field, check, what it must be), applied in order, the first failure named.

The calibration is read by key in many places (the race, the decisions, the heatmaps, the triage); a
hand-edited or truncated file must fail at load with the file and the field, not deep in a run with a
KeyError or a shape mismatch.
"""
from __future__ import annotations

from typing import Any, Callable

from cytoedge.runtime.errors import CalibrationError


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _nums(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_num(x) for x in v)


def _unit(v: Any) -> bool:
    return _num(v) and -1e-9 <= v <= 1.0 + 1e-9  # a fitted quantile may land a rounding step past 1


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _probe(p: Any) -> bool:
    return (isinstance(p, dict) and _whole(p.get("timestep")) and _whole(p.get("noise_index"))
            and p["noise_index"] >= 0 and _num(p.get("angle")) and isinstance(p.get("flip"), bool))


FIELDS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("probes", lambda v: isinstance(v, list) and bool(v) and all(_probe(p) for p in v),
     "a non-empty list of {timestep, noise_index, angle, flip}"),
    ("probe_weights", lambda v: _nums(v) and all(w >= 0 for w in v) and sum(v) > 0,
     "a list of numbers >= 0, one per probe, not all 0"),
    ("elimination_margins", _nums, "a list of numbers, one per probe"),
    ("temperature", lambda v: _num(v) and v > 0, "a positive number"),
    ("conformal_threshold", _unit, "a number in [0, 1]"),
    ("abstention_threshold", _unit, "a number in [0, 1]"),
    ("abnormal_threshold", _unit, "a number in [0, 1]"),
    ("anomaly_threshold", _num, "a number"),
    ("anomaly_normalisation", lambda v: isinstance(v, dict) and "kind" in v, "an object with a 'kind'"),
]


def validate_calibration(cal: Any, class_count: int, timesteps: int, where: str) -> None:
    """Raise CalibrationError naming ``where`` and the first field that is missing or malformed, or whose
    length does not match the probes, the classes or the schedule."""
    if not isinstance(cal, dict):
        raise CalibrationError(f"{where}: a calibration is a JSON object, not {type(cal).__name__}")
    for key, check, expected in FIELDS:
        if key not in cal:
            raise CalibrationError(f"{where}: field '{key}' is missing (it must be {expected}); rerun `cytoedge calibrate`")
        if not check(cal[key]):
            raise CalibrationError(f"{where}: field '{key}' is {cal[key]!r:.80}; it must be {expected}")
    n = len(cal["probes"])
    for key in ("probe_weights", "elimination_margins"):
        if len(cal[key]) != n:
            raise CalibrationError(f"{where}: field '{key}' has {len(cal[key])} values for {n} probes")
    late = [p["timestep"] for p in cal["probes"] if not 0 <= p["timestep"] < timesteps]
    if late:
        raise CalibrationError(f"{where}: probe timesteps {late} are outside the schedule's 0–{timesteps - 1}")
    by_depth = cal.get("temperature_by_depth")
    if by_depth is not None and not (_nums(by_depth) and all(t > 0 for t in by_depth)):
        raise CalibrationError(f"{where}: field 'temperature_by_depth' is {by_depth!r:.80}; it must be positive numbers")
    offsets = cal.get("class_offsets")
    if offsets is not None and not (isinstance(offsets, list) and len(offsets) == class_count
                                    and all(isinstance(r, list) and len(r) == n and all(_num(x) for x in r)
                                            for r in offsets)):
        raise CalibrationError(f"{where}: field 'class_offsets' must be {class_count} rows (classes) of {n} numbers "
                               "(probes)")
