"""Stain methods (Reinhard, Macenko, histogram matching) on fields drawn by the bundled model: a recoloured
field goes back towards the reference, a reference-coloured one stays, a blank or uniform one is left as it
is, a slide whose map cannot be fitted is scored as scanned, and --stain-method reaches the options."""
from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys

import cv2
import numpy as np
import pytest

from cytoedge.export.make_bundle import stain_reference
from cytoedge.runtime.errors import BundleError
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
from cytoedge.runtime.sources import open_source
from cytoedge.runtime.stain import METHODS, lab_stats, reference_stats, stain_normaliser
from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear


def recolour(rgb: np.ndarray) -> np.ndarray:
    """Another lab's stain and camera, roughly: less red, more blue, a brighter green."""
    return np.clip(rgb.astype(np.float64) * [0.8, 0.95, 1.1] + [0, 5, 10], 0, 255).astype(np.uint8)


def with_reference(bundle, images: np.ndarray):
    """The bundle with every method's target fitted on ``images`` (as make_bundle fits them)."""
    return dataclasses.replace(bundle, manifest={**bundle.manifest, "stain_reference": stain_reference(images)})


def lab_distance(rgb: np.ndarray, reference) -> float:
    """Distance of a field's LAB mean and std from the reference's (OpenCV uint8 LAB, summed over channels)."""
    s = lab_stats(rgb)
    return float(np.abs(np.subtract(s.mean, reference.mean)).sum() + np.abs(np.subtract(s.std, reference.std)).sum())


@pytest.fixture(scope="module")
def smear(bundle, ort_backend):
    return generate_smear(bundle, ort_backend, SmearSpec(n_white=2, ddim_steps=6, seed=3))


@pytest.fixture(scope="module")
def smear_png(smear, tmp_path_factory):
    path = tmp_path_factory.mktemp("stain") / "smear.png"
    cv2.imwrite(str(path), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.mark.parametrize("method", METHODS)
def test_a_field_of_the_reference_colours_stays_and_a_recoloured_one_goes_back(bundle, smear, method):
    """With the targets fitted on the field itself, the field maps onto itself and its recoloured copy
    maps much closer to it than it was."""
    field = smear.rgb
    normaliser = stain_normaliser(with_reference(bundle, field[None]), method)
    same = np.abs(normaliser.normalise(field).astype(int) - field).mean()
    recoloured = recolour(field)
    before = np.abs(recoloured.astype(int) - field).mean()
    after = np.abs(normaliser.normalise(recoloured).astype(int) - field).mean()
    # Macenko rebuilds each pixel from two dyes: what is neither (the third optical-density direction) is lost
    assert same < (6.0 if method == "macenko" else 2.0), f"{method}: the reference field moved by {same:.2f} grey levels"
    assert after < 0.5 * before, f"{method}: recoloured field {before:.1f} -> {after:.1f} grey levels from the original"


@pytest.mark.parametrize("method", METHODS)
def test_the_bundled_targets_move_a_recoloured_field_towards_the_training_colours(bundle, smear, method):
    reference = reference_stats(bundle)
    recoloured = recolour(smear.rgb)
    out = stain_normaliser(bundle, method).normalise(recoloured)
    assert out.shape == recoloured.shape and out.dtype == np.uint8
    assert lab_distance(out, reference) < lab_distance(recoloured, reference)


@pytest.mark.parametrize("method", METHODS)
def test_blank_and_uniform_fields_are_left_as_they_are_or_mapped_without_nans(bundle, method):
    normaliser = stain_normaliser(bundle, method)
    glass = np.full((64, 64, 3), 252, np.uint8)
    assert normaliser.fit(glass) is None
    np.testing.assert_array_equal(normaliser.normalise(glass), glass)
    for rgb in (np.full((64, 64, 3), 128, np.uint8), np.zeros((64, 64, 3), np.uint8)):
        out = normaliser.normalise(rgb)
        assert out.shape == rgb.shape and out.dtype == np.uint8
    assert stain_normaliser(bundle, "macenko").fit(np.full((64, 64, 3), 128, np.uint8)) is None  # one colour: no dyes


@pytest.mark.parametrize("method", METHODS)
def test_a_fitted_map_is_restored_exactly_from_its_record(bundle, smear, method):
    normaliser = stain_normaliser(bundle, method)
    fitted = normaliser.fit(recolour(smear.rgb))
    restored = normaliser.restore(json.loads(json.dumps(fitted.to_dict(None))))
    np.testing.assert_array_equal(restored.apply(smear.rgb), fitted.apply(smear.rgb))


def test_a_missing_target_is_refused_with_the_field_and_the_fix(bundle):
    reinhard_only = {k: v for k, v in bundle.manifest["stain_reference"].items() if k not in ("macenko", "histogram")}
    old = dataclasses.replace(bundle, manifest={**bundle.manifest, "stain_reference": reinhard_only})
    assert stain_normaliser(old, "reinhard") is not None
    with pytest.raises(BundleError, match="no 'macenko' target.*cytoedge.export.stain_reference"):
        stain_normaliser(old, "macenko")
    with pytest.raises(Exception, match="stain method 'vahadane'"):
        stain_normaliser(bundle, "vahadane")


def test_a_slide_whose_map_cannot_be_fitted_is_scored_as_scanned(bundle, ort_backend, smear_png, monkeypatch, caplog):
    monkeypatch.setattr("cytoedge.runtime.stain.macenko_vectors", lambda pixels: None)
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False,
                                                                     stain_method="macenko"))
    with caplog.at_level(logging.WARNING):
        cells = list(scorer.score_source(open_source(smear_png, 0.2)))
    assert "too little stain" in caplog.text
    assert scorer.summary()["stain"] == {"method": "macenko", "context": "slide", "fitted": None,
                                         "left_as_scanned": True}
    plain = list(SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False,
                                                                         stain_normalise=False))
                 .score_source(open_source(smear_png, 0.2)))
    assert cells and [c["probabilities"] for c in cells] == [c["probabilities"] for c in plain]


def test_stain_method_flag_reaches_the_scoring_options(smear_png, tmp_path):
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "cytoedge.runtime.cli", "score", str(smear_png), "--out", str(out),
                          "--um-per-px", "0.2", "--stain-method", "histogram", "--no-heatmaps", "--threads", "1",
                          "--no-run-log"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["run"]["options"]["stain_method"] == "histogram"
    assert all(s["summary"]["stain"]["method"] == "histogram" for s in doc["slides"])


def test_crop_commands_take_the_method_and_record_it(crop_files, capsys):
    from cytoedge.runtime.cli import main

    rc = main(["classify", *map(str, crop_files[:2]), "--json", "--threads", "1", "--stain-method", "macenko"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["stain_normalisation"] == "macenko-per-crop" and len(doc["results"]) == 2


def test_a_method_with_normalisation_off_is_refused(smear_png, tmp_path, capsys):
    from cytoedge.runtime.cli import main

    rc = main(["score", str(smear_png), "--out", str(tmp_path), "--stain-method", "macenko", "--no-stain-normalisation",
               "--threads", "1", "--no-run-log"])
    assert rc != 0 and "--stain-method macenko and --no-stain-normalisation" in capsys.readouterr().err
