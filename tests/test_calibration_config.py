"""calibration.json as a typed object (runtime/calibration_config.py): each malformed field refused with its
name, the bundled calibrations read and written back exactly, and what the fit writes loads."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cytoedge.runtime.calibration_config import Calibration, calibration_schema
from cytoedge.runtime.errors import CalibrationError

MODELS = Path(__file__).resolve().parents[1] / "models"
BUNDLED = ["pbc32-ddpm", "rbc32-ddpm"]
WHERE = "bundle/calibration.json"


def bundled(name: str) -> dict:
    return json.loads((MODELS / name / "calibration.json").read_text())


def load(doc: dict, classes: int = 8, timesteps: int = 1000) -> Calibration:
    return Calibration.from_dict(doc, classes, timesteps, WHERE)


@pytest.mark.parametrize("name", BUNDLED)
def test_the_bundled_calibrations_round_trip_exactly(name):
    text = (MODELS / name / "calibration.json").read_text()
    manifest = json.loads((MODELS / name / "manifest.json").read_text())
    cal = Calibration.from_dict(json.loads(text), len(manifest["class_names"]), 1000, name)
    assert cal.to_dict() == json.loads(text)
    assert json.dumps(cal.to_dict(), indent=2) + "\n" == text  # as calibration/artefact.py writes it
    # the audit's fingerprint (runtime/slide_scoring.estimator_settings) is the file's, as before
    assert (hashlib.sha256(json.dumps(cal.to_dict(), sort_keys=True).encode()).hexdigest()
            == hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest())


def test_fields_are_typed_and_read_only():
    cal = load(bundled("pbc32-ddpm"))
    assert cal.probes[0].timestep == 100 and cal.probes[0].flip is True
    assert cal.probe_weights.dtype == np.float64 and cal.probe_weights.shape == (len(cal.probes),)
    assert cal.anomaly_normalisation.kind == "null_ratio" and cal.anomaly_normalisation.std.shape == (4,)
    assert isinstance(cal.thresholds.abstention, float) and cal.temperature_by_depth == tuple(
        bundled("pbc32-ddpm")["temperature_by_depth"])
    assert cal.class_offsets is None and cal.triage is None
    for array in (cal.probe_weights, cal.elimination_margins, cal.anomaly_normalisation.mean):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.temperature = 2.0


def _set(path, value):
    def change(doc):
        *parents, last = path
        node = doc
        for part in parents:
            node = node[part]
        node[last] = value
    return change


def _drop(path):
    def change(doc):
        *parents, last = path
        node = doc
        for part in parents:
            node = node[part]
        del node[last]
    return change


def assert_refused(change, message: str) -> None:
    """The bundled calibration, changed, fails to load with ``message`` after the file's name."""
    doc = bundled("pbc32-ddpm")
    change(doc)
    with pytest.raises(CalibrationError) as e:
        load(doc)
    assert str(e.value).startswith(f"{WHERE}: ") and message in str(e.value)


@pytest.mark.parametrize("change,message", [
    (_drop(["temperature"]), "field 'temperature' is missing (it must be a positive number"),
    (_set(["temperature"], -1), "field 'temperature' is -1; it must be a positive number"),
    (_set(["temperature"], float("nan")), "field 'temperature' is nan; it must be a positive number"),
    (_set(["temperature"], True), "field 'temperature' is True; it must be a positive number"),
    (_drop(["probes", 0, "timestep"]), "field 'probes[0].timestep' is missing (it must be an integer >= 0"),
    (_set(["probes", 2, "timestep"], 2.0), "field 'probes[2].timestep' is 2.0; it must be an integer"),
    (_set(["probes", 1, "flip"], 1), "field 'probes[1].flip' is 1; it must be true or false"),
    (_set(["probes", 0, "noise_index"], -1), "field 'probes[0].noise_index' is -1; it must be an integer >= 0"),
    (_set(["probes"], []), "field 'probes' is []; it must be a non-empty list"),
    (_set(["probe_weights"], [1.0, 0.0, 1.0, 1.0]), "field 'probe_weights[1]' is 0.0; 'probe_weights' must be a "
                                                     "list of positive numbers"),
    (_set(["elimination_margins"], "wide"), "field 'elimination_margins' is 'wide'; it must be a list of numbers"),
    (_set(["conformal_threshold"], 1.5), "field 'conformal_threshold' is 1.5; it must be a number in [0, 1]"),
    (_set(["abnormal_threshold"], -0.1), "field 'abnormal_threshold' is -0.1; it must be a number in [0, 1]"),
    (_set(["anomaly_threshold"], None), "field 'anomaly_threshold' is None; it must be a number"),
    (_set(["anomaly_normalisation", "kind"], "z"), "field 'anomaly_normalisation.kind' is 'z'; it must be "
                                                   "'null_ratio' or 'leader_error'"),
    (_drop(["anomaly_normalisation", "std"]), "field 'anomaly_normalisation.std' is missing"),
    (_set(["temperature_by_depth"], [1.0, 0.0]), "field 'temperature_by_depth[1]' is 0.0; 'temperature_by_depth' "
                                                 "must be a list of positive numbers"),
    (_set(["noise_bank_size"], 0), "field 'noise_bank_size' is 0; it must be an integer >= 1"),
    (_set(["format_version"], 2), "field 'format_version' is 2; it must be the integer 1"),
    (_set(["settings", "split_a_fraction"], 1.0), "field 'settings.split_a_fraction' is 1.0; it must be a number "
                                                  "strictly between 0 and 1"),
    (_set(["fit_cells"], {"A": 10}), "field 'fit_cells.B' is missing"),
    (_set(["provenance"], "today"), "field 'provenance' is 'today'; it must be an object"),
    (_set(["temprature"], 1.0), "field 'temprature' is not a calibration field"),
    (_set(["probes", 0, "weight"], 1.0), "field 'probes[0].weight' is not a calibration field"),
    (_set(["triage"], {"min_white_cells": -5}), "field 'triage.min_white_cells' is -5; it must be an integer >= 0"),
    (_set(["triage"], {"differential_ranges": {"neutrophil": [0.4]}}),
     "field 'triage.differential_ranges.neutrophil' is [0.4]; it must be [low, high]"),
])
def test_the_schema_refuses_a_malformed_field_naming_it(change, message):
    assert_refused(change, message)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(probe_weights=c["probe_weights"][:-1]), "field 'probe_weights' has 3 values for 4 probes"),
    (lambda c: c.update(elimination_margins=c["elimination_margins"] * 2), "'elimination_margins' has 8 values"),
    (lambda c: c["anomaly_normalisation"].update(mean=[0.0]), "'anomaly_normalisation.mean' has 1 values for 4"),
    (lambda c: c["probes"][0].update(timestep=1000), "probe timesteps [1000] are outside the schedule's 0–999"),
    (lambda c: c["probes"][0].update(noise_index=16), "probe noise_index [16] are outside the noise bank's 0–15"),
    (lambda c: c.update(class_offsets=[[0.0] * 4] * 7), "'class_offsets' must be 8 rows (classes) of 4 numbers "
                                                        "(probes); it has 7 rows"),
    (lambda c: c.update(class_offsets=[[0.0] * 4] * 7 + [[0.0] * 3]), "field 'class_offsets[7]' has 3 values; "
                                                                      "'class_offsets' must be 8 rows"),
    (lambda c: c.update(class_offsets=[[0.0] * 4] * 7 + [[0.0, 0.0, "x", 0.0]]),
     "field 'class_offsets[7][2]' is 'x'"),
])
def test_lengths_against_the_probes_classes_and_schedule_are_checked(change, message):
    assert_refused(change, message)


def test_a_fitted_quantile_one_rounding_step_past_1_is_accepted():
    doc = bundled("pbc32-ddpm")
    doc["conformal_threshold"] = 1.0000000000000002
    assert load(doc).thresholds.conformal == 1.0000000000000002


def test_optional_fields_load_and_round_trip():
    doc = bundled("pbc32-ddpm")
    doc.pop("temperature_by_depth")
    doc["class_offsets"] = np.arange(32.0).reshape(8, 4).tolist()
    doc["labelled_classes"] = ["neutrophil", "lymphocyte"]
    doc["triage"] = {"min_white_cells": 50, "differential_ranges": {"neutrophil": [0.3, 0.8]},
                     "not_in_differential": ["platelet", "erythroblast"]}
    cal = load(doc)
    assert cal.temperature_by_depth is None and cal.class_offsets.shape == (8, 4)
    assert cal.to_dict() == doc
    assert load(copy.deepcopy(cal.to_dict())).to_dict() == doc


def test_the_schemas_triage_keys_are_the_triage_policys_fields():
    from cytoedge.runtime.summary import TriagePolicy

    assert set(calibration_schema()["$defs"]["triage"]["properties"]) == {
        f.name for f in dataclasses.fields(TriagePolicy)}


def test_what_the_fit_writes_is_what_loading_accepts(rng):
    """calibration/artefact.fitted_calibration checks a fit the way loading does, site fit included."""
    from cytoedge.calibration.artefact import candidate_probes, fitted_calibration
    from cytoedge.calibration.fit import fit_calibration

    y = rng.integers(0, 4, 400)
    E = np.abs(rng.normal(1.0, 0.1, (400, 4, 6)))
    E[np.arange(400), y, :] -= 0.3
    candidates = candidate_probes([100, 200, 300], 2)
    source = fitted_calibration(fit_calibration(E, y, list("abcd"), ["d"]), candidates, 7, {"command": "test"}, 4,
                                1000, WHERE)
    site = fit_calibration(E, y % 3, list("abcd"), ["d"], site_of=source)
    adapted = fitted_calibration(site, candidates, 7, {}, 4, 1000, WHERE)
    assert adapted.class_offsets.shape == (4, len(adapted.probes))
    assert adapted.labelled_classes == ("a", "b", "c")
    assert load(json.loads(json.dumps(adapted.to_dict())), classes=4).to_dict() == adapted.to_dict()
    with pytest.raises(CalibrationError, match="'class_offsets' must be 5 rows"):
        fitted_calibration(site, candidates, 7, {}, 5, 1000, WHERE)
