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
