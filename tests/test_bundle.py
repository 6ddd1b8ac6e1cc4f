"""Model bundle loading: schema, hashes, and errors that name the file and field at fault."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cytoedge.models import default_bundle_path
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BundleError
from cytoedge.runtime.schedule import NoiseSchedule


@pytest.fixture
def bundle_copy(tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), dst)
    return dst


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_bundled_model_loads_with_its_contract(bundle):
    assert bundle.class_names[:2] == ["basophil", "eosinophil"] and len(bundle.class_names) == 8
    assert set(bundle.abnormal_classes) == {"ig", "erythroblast"}
    assert bundle.denoiser_path.stat().st_size < 20 * 2**20
    mask = bundle.loss_mask()
    assert mask.shape == (bundle.input_size,) * 2 and 0 < mask.mean() < 1
    assert bundle.schedule.num_train_timesteps == bundle.manifest["noise_schedule"]["num_train_timesteps"]


def test_tampered_network_is_refused_naming_the_file(bundle_copy):
    onnx = bundle_copy / "denoiser.onnx"
    data = bytearray(onnx.read_bytes())
    data[-100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"denoiser\.onnx: sha256 .* does not match"):
        ModelBundle.load(bundle_copy)


MANIFEST_BREAKS = {
    "a nested field of the wrong type": (lambda m: m["input"].update(size="32"),
                                         r"field 'input\.size' is '32'; it must be an integer >= 8"),
    "std of zero": (lambda m: m["input"]["normalisation"].update(std=[0.5, 0.0, 0.5]),
                    r"field 'input\.normalisation\.std\[1\]' is 0\.0; 'input\.normalisation\.std' must be three positive"),
    "a key no reader knows": (lambda m: m.update(clas_names=["x"]), r"field 'clas_names' is not a manifest field"),
    "a file hash cut short": (lambda m: m["files"]["denoiser.onnx"].update(sha256="abc"),
                              r"field 'files\.denoiser\.onnx\.sha256' is 'abc'; it must be 64 hex digits"),
    "a network without its file": (lambda m: m["networks"]["denoiser"].pop("file"),
                                   r"field 'networks\.denoiser\.file' is missing"),
    "a mask radius past the edge": (lambda m: m["loss_mask"].update(radius=0.7),
                                    r"field 'loss_mask\.radius' is 0\.7; it must be a number in \(0, 0\.5\]"),
    "an unknown cell type": (lambda m: m.update(cell_type="platelet"), r"field 'cell_type' is 'platelet'; it must be"),
    "a calibration the files do not list": (lambda m: m.update(calibration="cal2.json"),
                                            r"field 'calibration' names 'cal2\.json', which 'files' does not list"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_BREAKS))
def test_the_manifest_schema_names_the_field_and_what_it_must_be(bundle_copy, case):
    """manifest.json is checked at load by runtime/schemas/manifest.schema.json, then across fields: the
    message names the file, the field (nested, with list indices) and what it must be."""
    change, message = MANIFEST_BREAKS[case]
    edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=message) as e:
        ModelBundle.load(bundle_copy)
    assert str(bundle_copy / "manifest.json") in str(e.value)


def test_missing_field_is_named(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m["input"].pop("um_per_px"))
    with pytest.raises(BundleError, match=r"'input\.um_per_px' is missing"):
        ModelBundle.load(bundle_copy)


def test_wrong_value_is_named(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.__setitem__("abnormal_classes", ["blast"]))
    with pytest.raises(BundleError, match=r"abnormal_classes \['blast'\] are not in class_names"):
        ModelBundle.load(bundle_copy)


def test_null_class_id_must_follow_the_classes(bundle_copy):
    edit_manifest(bundle_copy, lambda m: m.__setitem__("null_class_id", 3))
    with pytest.raises(BundleError, match=r"'null_class_id' is 3; it must be 8"):
        ModelBundle.load(bundle_copy)


def test_missing_listed_file_is_named(bundle_copy):
    (bundle_copy / "denoiser.onnx").unlink()
    with pytest.raises(BundleError, match="file 'denoiser.onnx' listed in the manifest is missing"):
        ModelBundle.load(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json not found"):
        ModelBundle.load(tmp_path)


def test_invalid_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        ModelBundle.load(bundle_copy)


def test_schedules_match_their_definitions():
    lin = NoiseSchedule.from_config({"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000})
    assert np.isclose(lin.alphas_cumprod[0], 1 - 1e-4)
    assert np.isclose(lin.alphas_cumprod[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    sd = NoiseSchedule.from_config({"kind": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                    "num_train_timesteps": 1000})
    assert np.isclose(1 - sd.alphas_cumprod[-1] / sd.alphas_cumprod[-2], 0.012)
    with pytest.raises(BundleError, match="beta_start"):
        NoiseSchedule.from_config({"kind": "linear", "beta_start": 0.1, "beta_end": 0.01, "num_train_timesteps": 10})
    with pytest.raises(BundleError, match="kind"):
        NoiseSchedule.from_config({"kind": "cosine"})


def test_a_staged_file_replaces_its_namesake_only_together_with_the_manifest(bundle_copy, monkeypatch):
    """write_manifest(staged=...): a refused manifest leaves the old file and manifest; a failed move of the
    manifest puts the old file back; a successful one moves both, and the bundle loads."""
    import os

    from cytoedge.runtime import bundle as bundle_module
    from cytoedge.runtime.bundle import write_manifest

    name = "calibration.json"
    old = {p.name: p.read_bytes() for p in bundle_copy.iterdir()}
    staged = bundle_copy / ".calibration.staged"
    new = (bundle_copy / name).read_text().replace('"provenance": {', '"provenance": {"staged": 1, ', 1).encode()
    staged.write_bytes(new)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())

    with pytest.raises(BundleError):
        write_manifest(bundle_copy, {**manifest, "format_version": 99}, staged={name: staged})
    real_replace = os.replace

    def failing_manifest_move(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", failing_manifest_move)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(bundle_copy, json.loads(json.dumps(manifest)), staged={name: staged})
    monkeypatch.setattr(bundle_module.os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in bundle_copy.iterdir() if p != staged} == old
    ModelBundle.load(bundle_copy)

    staged.write_bytes(new)  # the failed move used it up
    write_manifest(bundle_copy, manifest, staged={name: staged})
    assert not staged.exists() and (bundle_copy / name).read_bytes() == new
    assert sorted(p.name for p in bundle_copy.iterdir()) == sorted(old)  # no temporary file left behind
    assert ModelBundle.load(bundle_copy).calibration.provenance["staged"] == 1


@pytest.mark.parametrize("change,field", [
    (lambda c: c.pop("temperature"), "'temperature' is missing"),
    (lambda c: c.update(probe_weights=c["probe_weights"][:-1]), "'probe_weights' has"),
    (lambda c: c.update(abstention_threshold=1.5), "'abstention_threshold'"),
    (lambda c: c["probes"][0].update(timestep=5000), "outside the schedule"),
    (lambda c: c.update(class_offsets=[[0.0]]), "'class_offsets' must be"),
    (lambda c: c["probes"][1].pop("timestep"), r"'probes\[1\]\.timestep' is missing"),
    (lambda c: c.update(temperature=-1), "field 'temperature' is -1; it must be a positive number"),
    (lambda c: c.update(triage={"min_white_cell": 50}), "'triage.min_white_cell' is not a calibration field"),
])
def test_a_malformed_calibration_is_refused_at_load_naming_the_field(bundle_copy, change, field):
    from cytoedge.runtime.bundle import write_manifest
    from cytoedge.runtime.errors import CalibrationError

    path = bundle_copy / "calibration.json"
    cal = json.loads(path.read_text())
    change(cal)
    path.write_text(json.dumps(cal))
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))  # re-hash: only the content is wrong
    with pytest.raises(CalibrationError, match=field) as e:
        ModelBundle.load(bundle_copy)
    assert str(path) in str(e.value)


def test_a_calibration_that_is_not_json_is_refused_at_load_naming_the_file(bundle_copy):
    from cytoedge.runtime.bundle import write_manifest
    from cytoedge.runtime.errors import CalibrationError

    path = bundle_copy / "calibration.json"
    path.write_text(path.read_text()[:-20])  # truncated
    write_manifest(bundle_copy, json.loads((bundle_copy / "manifest.json").read_text()))
    with pytest.raises(CalibrationError, match="not valid JSON") as e:
        ModelBundle.load(bundle_copy)
    assert str(path) in str(e.value)
