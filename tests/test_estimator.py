"""The fast estimator: the race's arithmetic on known errors, and determinism on the real model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.classify_cells import classify_batch, score_cells_fast
from cytoedge.runtime.errors import BackendError, CalibrationError
from cytoedge.runtime.estimator import RaceSettings, run_race


def lookup(E):
    calls = []

    def errors(cells, classes, k):
        calls.append((k, len(cells)))
        return E[cells, classes, k]

    return errors, calls


def test_race_without_elimination_sums_weighted_errors():
    E = np.array([[[1.0, 2.0], [1.5, 1.0], [3.0, 3.0]]])  # 1 cell, 3 classes, 2 probes
    settings = RaceSettings(np.array([1.0, 2.0]), np.array([np.inf, np.inf]))
    errors, calls = lookup(E)
    res = run_race(1, 3, settings, errors)
    scores = E[0] @ np.array([1.0, 2.0])  # 5.0, 3.5, 9.0
    np.testing.assert_allclose(res.gaps[0], scores - scores.min())
    assert res.nfe.tolist() == [6] and calls == [(0, 3), (1, 3)]
    p = res.probabilities(1.0)[0]
    np.testing.assert_allclose(p, np.exp(-(scores - 3.5)) / np.exp(-(scores - 3.5)).sum())


def test_elimination_drops_far_classes_and_extrapolates_their_gap():
    E = np.array([[[1.0, 1.0, 1.0], [1.2, 1.1, 1.0], [4.0, 4.0, 4.0]]])
    settings = RaceSettings(np.ones(3), np.array([1.0, 1.0, 0.0]))
    errors, calls = lookup(E)
    res = run_race(1, 3, settings, errors)
    assert calls == [(0, 3), (1, 2), (2, 2)]  # class 2 dropped after probe 0
    assert res.nfe.tolist() == [7]
    assert res.probes_run[0].tolist() == [3, 3, 1]
    assert res.gaps[0, 2] == pytest.approx((4.0 - 1.0) * 3)  # gap after 1 probe × W_3 / W_1
    assert res.gaps[0, 1] == pytest.approx(0.3)


def test_race_stops_when_one_class_is_left():
    E = np.array([[[0.1, 0.1], [5.0, 5.0]], [[1.0, 1.0], [1.0, 1.0]]])
    res = run_race(2, 2, RaceSettings(np.ones(2), np.array([1.0, 1.0])), lookup(E)[0])
    assert res.nfe.tolist() == [2, 4]


def test_null_class_is_measured_beside_every_probe_a_cell_runs():
    # cell 0 is decided after probe 0; cell 1 stays open. Class id 2 is the null class.
    E = np.array([[[0.1, 0.1], [5.0, 5.0], [0.4, 0.2]], [[1.0, 1.0], [1.0, 1.0], [2.0, 4.0]]])
    errors, calls = lookup(E)
    res = run_race(2, 2, RaceSettings(np.array([1.0, 3.0]), np.array([1.0, 1.0])), errors, null_class=2)
    assert calls == [(0, 6), (1, 3)]  # null pairs ride in the same backend call
    assert res.nfe.tolist() == [3, 6]
    np.testing.assert_allclose(res.null_errors, [[0.4, np.nan], [2.0, 12.0]])
    np.testing.assert_allclose(res.gaps, run_race(2, 2, RaceSettings(np.array([1.0, 3.0]), np.array([1.0, 1.0])),
                                                  lookup(E[:, :2])[0]).gaps)  # the null class never races


def test_non_finite_errors_are_refused():
    E = np.full((1, 2, 1), np.nan)
    with pytest.raises(BackendError, match="non-finite"):
        run_race(1, 2, RaceSettings(np.ones(1), np.ones(1)), lookup(E)[0])


def test_results_are_bit_identical_across_backend_batch_sizes(generated_batch, bundle):
    small = score_cells_fast(generated_batch, bundle, OnnxRuntimeBackend(bundle, threads=1, max_batch=3))
    large = score_cells_fast(generated_batch, bundle, OnnxRuntimeBackend(bundle, threads=1, max_batch=256))
    assert np.array_equal(small.decisions.probabilities, large.decisions.probabilities)
    assert np.array_equal(small.nfe, large.nfe)
    again = score_cells_fast(generated_batch, bundle, OnnxRuntimeBackend(bundle, threads=1, max_batch=256))
    assert np.array_equal(again.decisions.probabilities, large.decisions.probabilities)


def test_fast_records_are_consistent(generated_batch, bundle, ort_backend):
    records = classify_batch(generated_batch, bundle, ort_backend, "fast")
    assert len(records) == len(generated_batch)
    for r in records:
        probs = r["probabilities"]
        assert set(probs) == set(bundle.class_names) and sum(probs.values()) == pytest.approx(1, abs=1e-4)
        assert r["class"] == max(probs, key=probs.get)
        assert r["class"] in r["prediction_set"] or r["flags"]["uncertain"]
        assert len(bundle.class_names) <= r["nfe"] <= len(bundle.class_names) * len(bundle.calibration.probes)
        abnormal_p = sum(probs[c] for c in bundle.abnormal_classes)
        assert r["abnormal_probability"] == pytest.approx(abnormal_p, abs=1e-5)
        assert r["flags"]["abnormal"] == (abnormal_p >= bundle.calibration.thresholds.abnormal)


def test_generated_cells_are_mostly_recognised(generated_batch, generated_cells, bundle, ort_backend):
    """The model should recognise what it drew itself far above chance (1/8)."""
    _, labels = generated_cells
    pred = score_cells_fast(generated_batch, bundle, ort_backend).decisions.class_id
    assert (pred == labels).mean() >= 0.5


def test_uncalibrated_bundle_says_how_to_fix_it(tmp_path, bundle, generated_batch, ort_backend):
    dst = tmp_path / "b"
    shutil.copytree(bundle.path, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("calibration", None)
    manifest["files"].pop("calibration.json", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    bare = ModelBundle.load(dst)
    with pytest.raises(CalibrationError, match="run `cytoedge calibrate"):
        score_cells_fast(generated_batch, bare, ort_backend)


def test_empty_batch_is_refused(generated_batch, bundle, ort_backend):
    with pytest.raises(ValueError, match="empty cell batch"):
        score_cells_fast(generated_batch.subset(np.array([], np.int64)), bundle, ort_backend)


def test_the_estimator_cuts_cells_with_the_manifests_normalisation(bundle, ort_backend, generated_batch):
    """A bundle whose manifest says RGB [0, 1] → (x − 0.25) / 2 gets exactly those inputs (no hard-coded 0.5)."""
    import copy
    import dataclasses

    from cytoedge.runtime.estimator import DenoiserErrorSource, noise_bank, probes_from_calibration

    manifest = copy.deepcopy(bundle.manifest)
    manifest["input"]["normalisation"] = {"mean": [0.25] * 3, "std": [2.0] * 3}
    other = dataclasses.replace(bundle, manifest=manifest)
    probes, _ = probes_from_calibration(bundle)
    base = DenoiserErrorSource(generated_batch, bundle, ort_backend, probes, noise_bank(bundle)).x0
    moved = DenoiserErrorSource(generated_batch, other, ort_backend, probes, noise_bank(bundle)).x0
    np.testing.assert_allclose(moved, ((base * 0.5 + 0.5) - 0.25) / 2.0, atol=1e-5)


def test_pixels_beyond_a_tile_reach_the_model_as_glass_not_black(bundle):
    """A cell at the slide's edge: the part of its cut beyond the tile is white (glass), the rest as cut."""
    from cytoedge.kernels import prepare_batch
    from cytoedge.kernels.cell_batch import cell_table
    from cytoedge.runtime.cells import model_inputs

    tile = np.full((64, 64, 3), 90, np.uint8)
    cells = cell_table(np.array([0]), np.array([2.0]), np.array([30.0]))  # half the cut lies left of the tile
    x, valid = prepare_batch([tile], cells, bundle.input_size, bundle.colour_transform())
    got = model_inputs([tile], cells, bundle)
    outside = valid[0] == 0
    assert outside.any() and (~outside).any()
    np.testing.assert_allclose(got[0][:, outside], 1.0)  # white in the bundle's [-1, 1] range
    np.testing.assert_array_equal(got[0][:, ~outside], x[0][:, ~outside])
    assert x[0][:, outside].mean() < -0.9  # what the kernels alone give: black
