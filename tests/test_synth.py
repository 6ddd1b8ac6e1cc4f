"""Synthetic cells and smears from the bundled denoiser, and the synth/demo commands."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cytoedge.runtime.commands.demo import demo_classes
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.synthetic_smear import SmearSpec, compose_smear, match_truth, sample_cells


def test_sample_cells_shape_and_seed(bundle, ort_backend):
    a = sample_cells(bundle, ort_backend, ["lymphocyte", "ig"], steps=4, seed=1)
    b = sample_cells(bundle, ort_backend, ["lymphocyte", "ig"], steps=4, seed=1)
    assert a.shape == (2, bundle.input_size, bundle.input_size, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    with pytest.raises(CytoedgeError, match="unknown class"):
        sample_cells(bundle, ort_backend, ["dragon"], steps=2, seed=0)


def test_compose_smear_places_cells_where_the_truth_says(bundle, rng):
    cells = np.zeros((5, bundle.input_size, bundle.input_size, 3), np.uint8)  # black cells: easy to find
    spec = SmearSpec(n_white=5, um_per_px=0.25, seed=2)
    smear = compose_smear(cells, ["ig"] * 5, bundle, spec)
    assert len(smear.truth) == 5 and smear.n_red > 0
    for t in smear.truth:
        x, y = (int(round(v)) for v in t["centre"])
        assert smear.rgb[y, x].max() < 10
        x0, y0, x1, y1 = t["bbox"]
        assert x0 < x < x1 and y0 < y < y1
    fake = [{"centre": t["centre"], "class": "ig"} for t in smear.truth[:4]] + [{"centre": [0, 0], "class": "ig"}]
    m = match_truth(smear.truth, fake)
    assert (m["detected"], m["extra"], m["class_agreement"]) == (4, 1, 1.0)


def test_demo_mix_adds_up(bundle):
    classes = demo_classes(bundle.class_names, 37)
    assert len(classes) == 37 and set(classes) <= set(bundle.class_names)
    assert {"ig", "erythroblast"} & set(classes)


def test_synth_command_writes_cells_and_smear(tmp_path):
    from cytoedge.runtime.cli import main

    assert main(["synth", "--class", "monocyte", "-n", "3", "--steps", "3", "--out", str(tmp_path / "c"),
                 "--threads", "1"]) == 0
    index = json.loads((tmp_path / "c" / "cells.json").read_text())
    assert [c["class"] for c in index["cells"]] == ["monocyte"] * 3
    assert cv2.imread(str(tmp_path / "c" / index["cells"][0]["file"])) is not None
    assert main(["synth", "--smear", "-n", "2", "--steps", "3", "--out", str(tmp_path / "s"), "--dicom",
                 "--threads", "1"]) == 0
    truth = json.loads((tmp_path / "s" / "truth.json").read_text())
    assert len(truth["white_cells"]) == 2 and (tmp_path / "s" / "smear.dcm").is_file()


def test_demo_command_scores_its_own_smear(tmp_path, capsys):
    from cytoedge.runtime.cli import main

    code = main(["demo", "-n", "3", "--steps", "4", "--out", str(tmp_path), "--threads", "1", "--quiet",
                 "--no-heatmaps"])
    out = capsys.readouterr().out
    assert code == 0 and "triage:" in out and "ground truth:" in out
    match = json.loads((tmp_path / "demo_truth_match.json").read_text())
    assert match["truth"] == 3 and match["detected"] >= 2
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["slides"][0]["status"] == "ok"
    red = doc["slides"][0]["summary"]["red_cells"]  # the bundled red-cell model reads the drawn red cells too
    assert f"red-cell reading ({red['red_cells_classified']} cells) shows the mechanism" in out


class RecordingBackend:
    """ε̂ = class id + timestep/1000 everywhere: makes the guidance arithmetic checkable by hand."""

    name, max_batch = "recording", 256

    def __init__(self):
        self.calls = []

    def predict_noise(self, x_t, timestep, class_id):
        self.calls.append(class_id.copy())
        return np.broadcast_to((class_id + timestep / 1000.0)[:, None, None, None], x_t.shape).astype(np.float32)


def test_guided_noise_extrapolates_from_the_null_prediction_in_one_batch():
    from cytoedge.runtime.sampler import guided_noise

    backend = RecordingBackend()
    x = np.zeros((2, 3, 4, 4), np.float32)
    eps = guided_noise(backend, x, 500, np.array([1, 3]), null_id=8, guidance=2.0)
    assert [c.tolist() for c in backend.calls] == [[1, 3, 8, 8]]  # conditional and null in one call
    # ε_null + w (ε_c − ε_null) = 8.5 + 2 (c + 0.5 − 8.5)
    np.testing.assert_allclose(eps[:, 0, 0, 0], [8.5 + 2 * (1.5 - 8.5), 8.5 + 2 * (3.5 - 8.5)])
    plain = guided_noise(backend, x, 500, np.array([1, 3]), null_id=8, guidance=1.0)
    np.testing.assert_allclose(plain[:, 0, 0, 0], [1.5, 3.5])
    assert backend.calls[-1].tolist() == [1, 3]  # no null prediction without guidance


def test_guidance_comes_from_the_bundle_and_bad_values_are_refused(bundle, ort_backend, tmp_path):
    import shutil

    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.errors import BundleError
    from cytoedge.runtime.sampler import ddim_sample

    assert bundle.guidance_scale == bundle.manifest["sampling"]["guidance_scale"] > 1
    backend = RecordingBackend()
    ddim_sample(bundle, backend, np.array([0]), steps=2)
    assert backend.calls[0].tolist() == [0, bundle.null_class_id]
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guidance must be a finite number >= 1"):
            ddim_sample(bundle, backend, np.array([0]), steps=2, guidance=bad)
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["sampling"]["guidance_scale"] = "strong"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="sampling.guidance_scale"):
        ModelBundle.load(dst)
    manifest["sampling"]["guidance_scale"] = 2.0
    manifest.pop("null_class_id")
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="needs a null class"):
        ModelBundle.load(dst)


def test_guided_cells_are_recognised_more_often_than_unguided(bundle, ort_backend):
    """What the bundle's guidance scale is for: the model's own classifier recognises what it drew."""
    from cytoedge.runtime.cells import tiles_to_batch
    from cytoedge.runtime.classify_cells import score_cells_fast

    labels = np.repeat(np.arange(len(bundle.class_names)), 3)
    names = [bundle.class_names[k] for k in labels]
    rates = {}
    for w in (1.0, bundle.guidance_scale):
        cells = sample_cells(bundle, ort_backend, names, steps=20, seed=5, guidance=w)
        pred = score_cells_fast(tiles_to_batch(list(cells), bundle.input_size), bundle, ort_backend).decisions.class_id
        rates[w] = (pred == labels).mean()
    assert rates[bundle.guidance_scale] >= 0.9 and rates[bundle.guidance_scale] > rates[1.0]


@pytest.mark.parametrize("value, message", [("0.5", "must be a finite number >= 1"), ("strong", "is not a number")])
def test_synth_refuses_a_bad_guidance_scale_by_name(tmp_path, capsys, value, message):
    from cytoedge.runtime.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "-n", "1", "--out", str(tmp_path), "--guidance", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--guidance" in err and message in err
