"""The red-cell bundle and its data: split, crops, scale, the shared machinery on red cells.

Generated images only: discs drawn with OpenCV, and cells drawn by the red-cell bundle itself.
"""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.runtime.bundle import ModelBundle, validate_manifest
from cytoedge.runtime.cells import declared_um_per_px, write_image_with_scale
from cytoedge.runtime.crop_scale import CropScaleEstimator
from cytoedge.runtime.detection import holds_a_cell
from cytoedge.runtime.errors import BundleError, CytoedgeError
from cytoedge.training.rbc_data import (CHULA_CLASSES, CHULA_UM_PER_PX, cut_crops, field_files, field_part, held_out,
                                        read_labels, write_crops)

RBC_BUNDLE = Path(__file__).resolve().parents[1] / "models" / "rbc32-ddpm"
PINK, PLASMA = (200, 120, 130), (225, 225, 215)


def disc_field(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int = 16) -> np.ndarray:
    """A pale field with a pink disc (a red cell, ~7.5 µm at Chula's scale) at each centre."""
    field = np.empty((*shape, 3), np.uint8)
    field[:] = PLASMA
    for x, y in centres:
        cv2.circle(field, (x, y), radius, PINK, -1)
    return field


@pytest.fixture(scope="module")
def rbc_bundle() -> ModelBundle:
    return ModelBundle.load(RBC_BUNDLE)


def test_split_follows_the_bytes_not_the_name(tmp_path):
    assert held_out(b"") is (hashlib.sha256(b"").digest()[0] % 2 == 1)
    (tmp_path / "images").mkdir()
    for i in range(24):  # the split reads only the bytes: these are fixed, whatever the JPEG encoder
        (tmp_path / "images" / f"{i}.jpg").write_bytes(b"field %d" % i)
    train, held = field_files(tmp_path, "train"), field_files(tmp_path, "held-out")
    assert set(train) | set(held) == set(field_files(tmp_path, "all")) and not set(train) & set(held)
    assert field_files(tmp_path, "held-out") == held  # deterministic
    calibration, measure = field_files(tmp_path, "calibration"), field_files(tmp_path, "measure")
    assert calibration and measure and set(calibration) | set(measure) == set(held)
    assert not set(calibration) & set(measure)
    assert all(field_part(p.read_bytes()) == ("calibration" if hashlib.sha256(p.read_bytes()).digest()[1] % 3 == 0
                                              else "measure") for p in held)
    moved = held[0].rename(tmp_path / "images" / "renamed.jpg")
    assert moved in field_files(tmp_path, "held-out")
    with pytest.raises(CytoedgeError, match="half must be"):
        field_files(tmp_path, "test")


def test_crops_are_centred_on_the_labels_and_mirrored_at_the_edges():
    centres = [(60, 50), (150, 90), (20, 100)]  # the last crop reaches past the left edge
    field = disc_field((160, 200), centres)
    for size in (96, 33):
        crops = cut_crops(field, [(float(x), float(y)) for x, y in centres], size)
        for crop in crops:
            assert crop.shape == (size, size, 3)
            ys, xs = np.nonzero((crop == PINK).all(axis=2))
            near = np.hypot(xs - size // 2, ys - size // 2) < 17  # the centred disc, not a neighbour
            assert abs(xs[near].mean() - size // 2) < 0.6 and abs(ys[near].mean() - size // 2) < 0.6


def test_labels_are_read_and_bad_lines_named(tmp_path):
    (tmp_path / "labels").mkdir()
    field = tmp_path / "images" / "3.jpg"
    (tmp_path / "labels" / "3.txt").write_text("10 20 0\n30 40 9\n")
    assert read_labels(tmp_path, field) == [(10.0, 20.0, 0), (30.0, 40.0, 9)]
    (tmp_path / "labels" / "3.txt").write_text("10 20 13\n")
    with pytest.raises(CytoedgeError, match=r"3.txt:1: class 13"):
        read_labels(tmp_path, field)
    assert read_labels(tmp_path, tmp_path / "images" / "4.jpg") == []  # no label file: no labelled cell


def test_written_crops_are_a_labelled_folder_that_declares_chulas_scale(tmp_path):
    data = tmp_path / "chula"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    for i in range(6):
        cv2.imwrite(str(data / "images" / f"{i}.png"), disc_field((120, 160), [(40 + i, 60), (110, 50)]))
        (data / "images" / f"{i}.png").rename(data / "images" / f"{i}.jpg")  # Chula has PNGs named .jpg too
        (data / "labels" / f"{i}.txt").write_text(f"{40 + i} 60 9\n110 50 0\n")
    counts = write_crops(data, tmp_path / "out", "all")
    assert counts["schistocyte"] == counts["normal"] == 6 and sum(counts.values()) == 12
    crop = next((tmp_path / "out" / "schistocyte").glob("*.png"))
    assert declared_um_per_px(crop) == pytest.approx(CHULA_UM_PER_PX, rel=1e-3)
    assert sum(write_crops(data, tmp_path / "few", "all", per_class=2).values()) == 4


def test_the_bundle_validates_and_says_what_it_reads(rbc_bundle):
    assert rbc_bundle.class_names == CHULA_CLASSES and rbc_bundle.cell_type == "red"
    assert set(rbc_bundle.abnormal_classes) == set(CHULA_CLASSES) - {"normal"}
    assert rbc_bundle.crop_scale_estimators == [] and rbc_bundle.calibration is not None
    # The model's scale is Chula's one dataset scale times the source pixels each model pixel holds.
    step = rbc_bundle.manifest["input"]["source_px_per_model_px"]
    assert 1.0 <= step <= 3.0 and rbc_bundle.um_per_px == pytest.approx(step * CHULA_UM_PER_PX, rel=1e-3)
    bad = copy.deepcopy(rbc_bundle.manifest)
    bad["cell_type"] = "platelet"
    with pytest.raises(BundleError, match="cell_type"):
        validate_manifest(bad, "m")
    bad = copy.deepcopy(rbc_bundle.manifest)
    bad["input"]["crop_scale"]["estimate_from"] = ["the-cell-itself"]
    with pytest.raises(BundleError, match="estimate_from"):
        validate_manifest(bad, "m")


def test_a_red_cell_crop_is_a_cell_though_it_has_no_nucleus():
    crop = disc_field((96, 96), [(48, 48), (10, 12)])
    assert holds_a_cell(crop, "red") and not holds_a_cell(crop, "white")
    assert not holds_a_cell(disc_field((96, 96), []), "red")
    noise = np.clip(np.random.default_rng(0).normal(220, 4, (96, 96, 3)), 0, 255).astype(np.uint8)
    assert not holds_a_cell(noise, "red")


def test_a_red_cell_crops_scale_is_never_estimated_from_its_cells(rbc_bundle, bundle):
    # Many 10-px discs: a white-cell bundle reads the scale from them (7.5 µm / 20 px), the red-cell
    # bundle does not (a field of microcytes would be read as normal), and falls back to its training scale.
    centres = [(x, y) for x in range(12, 180, 24) for y in range(12, 180, 24)]
    crop = disc_field((180, 180), centres, radius=10)
    red, white = CropScaleEstimator(rbc_bundle), CropScaleEstimator(bundle)
    for k in range(6):
        red.add(f"c{k}", crop)
        white.add(f"c{k}", crop)
    assert red.scale("c0").source == "bundle-default" and red.scale("c0").um_per_px == pytest.approx(CHULA_UM_PER_PX, rel=1e-3)
    assert white.scale("c0").source == "red-cells"
    red.add("declared", crop, declared=0.3)
    assert red.scale("declared").um_per_px == 0.3


def test_classify_reads_generated_red_cells_as_red_cell_classes(rbc_bundle, tmp_path):
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.sampler import ddim_sample

    labels = np.array([CHULA_CLASSES.index(c) for c in ("normal", "schistocyte", "target_cell")])
    cells = ddim_sample(rbc_bundle, OnnxRuntimeBackend(rbc_bundle, threads=1), labels, steps=8, seed=3)
    paths = []
    for i, im in enumerate(cells):
        paths.append(tmp_path / f"cell{i}.png")
        write_image_with_scale(paths[-1], cv2.resize(im, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC),
                               rbc_bundle.um_per_px / 2)
    paths.append(tmp_path / "disc.png")
    write_image_with_scale(paths[-1], disc_field((96, 96), [(48, 48)]), CHULA_UM_PER_PX)
    out = subprocess.run([sys.executable, "-m", "cytoedge.runtime.cli", "classify", "--model", str(RBC_BUNDLE),
                          "--json", "--threads", "1", *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert [r["image"] for r in doc["results"]] == list(map(str, paths))
    for r in doc["results"]:
        assert r["class"] in CHULA_CLASSES and set(r["probabilities"]) == set(CHULA_CLASSES)
        assert r["flags"]["no_cell"] is False and r["scale"]["source"] == "file"


def test_slide_scoring_and_smear_synthesis_refuse_a_red_cell_bundle(rbc_bundle, tmp_path, capsys):
    from cytoedge.runtime.cli import main
    from cytoedge.runtime.slide_scoring import SlideScorer

    with pytest.raises(CytoedgeError, match="reads red cells"):
        SlideScorer(rbc_bundle, backend=None)
    assert main(["synth", "--model", str(RBC_BUNDLE), "--smear", "--out", str(tmp_path / "s")]) != 0
    assert "reads red cells" in capsys.readouterr().err and not (tmp_path / "s").exists()
