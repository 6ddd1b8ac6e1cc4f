"""The red cells of a smear read beside its white cells, with the bundled red-cell model: a bounded
sample of separated red cells, classified by the same machinery, counted and graded; the reading in the
result document, the report, the review page and the DICOM annotations; and what the CLI options do."""
from __future__ import annotations

import json
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cytoedge.models import red_cell_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.red_cells import RedCellReader, RedCellSampling
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, score_slide
from cytoedge.runtime.sources import open_source
from cytoedge.runtime.synthetic_smear import SmearSpec, frames_of, generate_smear, write_smear_files, write_wsi_dicom

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]


@pytest.fixture(scope="module")
def red_bundle() -> ModelBundle:
    path = red_cell_bundle_path()
    assert path is not None, "the red-cell bundle ships with cytoedge (models/rbc32-ddpm)"
    return ModelBundle.load(path)


@pytest.fixture(scope="module")
def smear(bundle, ort_backend):
    return generate_smear(bundle, ort_backend, SmearSpec(n_white=6, ddim_steps=6, seed=11))


def test_a_slides_red_cells_are_sampled_classified_and_graded(bundle, ort_backend, red_bundle, smear, tmp_path):
    png = write_smear_files(smear, tmp_path)[0]
    reader = RedCellReader(red_bundle, OnnxRuntimeBackend(red_bundle, threads=1), RedCellSampling(target_cells=20,
                                                                                                  min_per_tile=4))
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=smear.um_per_px, heatmaps=False,
                                                                     tile_px=256), red_cells=reader)
    entry = score_slide(scorer, open_source(png, smear.um_per_px))
    red = entry["summary"]["red_cells"]
    assert red["red_cells_classified"] == 20 <= red["separated_red_cells_seen"]  # a bounded sample
    xs = [c["centre"][0] for c in scorer.red_sample["cells"]]
    assert max(xs) - min(xs) > 256  # spread over the slide's tiles (256 px), not all from the first
    assert sum(v["count"] for v in red["by_class"].values()) == red["red_cells_classified"]
    assert set(red["by_class"]) == set(red_bundle.class_names) and red["provisional"]  # < 1,000 cells
    assert {g["class"] for g in red["grades"].values()} <= set(red_bundle.grading["features"])
    assert red["bundle_sha256"] == red_bundle.sha256 and red["size_features"] == "assessed"  # scale was given
    assert red["triage"]["level"] in ("routine", "review", "urgent")
    # the red cells' triage joins the slide's, and the white cells are read as without the red-cell stage
    level = entry["summary"]["triage"]["level"]
    order = ["routine", "review", "urgent"]
    assert order.index(level) >= order.index(red["triage"]["level"])
    plain = score_slide(SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=smear.um_per_px,
                                                                                heatmaps=False, tile_px=256)),
                        open_source(png, smear.um_per_px))
    assert [c["class"] for c in plain["cells"]] == [c["class"] for c in entry["cells"]]
    assert len(scorer.red_sample["cells"]) == red["red_cells_classified"]
    # graded on the shares corrected for the model's confusions, which a resumed slide gets back
    assert red["shares"].startswith("corrected")
    assert sum(v["adjusted_percent"] for v in red["by_class"].values()) == pytest.approx(100, abs=0.01)
    resumed = RedCellReader(red_bundle, reader.backend)
    resumed.restore(json.loads(json.dumps(reader.checkpoint())))
    again = resumed.reading(None)
    assert resumed.sample == reader.sample  # the DICOM annotations' points survive a resume too
    assert again["grades"] == red["grades"] and again["by_class"] == red["by_class"]  # the same reading


def test_size_features_are_not_graded_at_a_scale_read_off_the_red_cells(red_bundle):
    reader = RedCellReader(red_bundle, OnnxRuntimeBackend(red_bundle, threads=1))
    reading = reader.reading("red-cells")
    assert "macrocytes" not in reading["grades"] and "microcytes" not in reading["grades"]
    assert reading["size_features"].startswith("not assessed")


def test_a_white_cell_bundle_cannot_read_red_cells(bundle, ort_backend):
    from cytoedge.runtime.errors import CytoedgeError

    with pytest.raises(CytoedgeError, match="cell_type 'red'"):
        RedCellReader(bundle, ort_backend)


def test_score_writes_the_reading_to_results_report_review_and_dicom(smear, tmp_path):
    h, w = smear.rgb.shape[:2]
    dcm = write_wsi_dicom(tmp_path / "slide.dcm", frames_of(smear.rgb, 256), (w, h), 256, smear.um_per_px,
                          codec="jpeg2000", organisation="TILED_FULL")
    out = tmp_path / "out"
    run = subprocess.run(CLI + ["score", str(dcm), "--out", str(out), "--red-cells-per-slide", "100", "--no-heatmaps",
                                "--threads", "1", "--quiet", "--no-run-log"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    entry = json.loads((out / "results.json").read_text())["slides"][0]
    red = entry["summary"]["red_cells"]
    assert 0 < red["red_cells_classified"] <= 100
    folder = out / "000_slide_dcm"
    assert "Red cells (" in (folder / "report.html").read_text()
    assert '"red_cells":{"classified":' in (folder / "review.html").read_text()
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(folder / "annotations.dcm"))
    points = {g.label: len(g.get_graphic_data(coordinate_type=ann.AnnotationCoordinateType))
              for g in ann.get_annotation_groups() if g.label.startswith("red cell: ")}
    assert sum(points.values()) == red["red_cells_classified"]
    assert points == {f"red cell: {c}": v["count"] for c, v in red["by_class"].items() if v["count"]}
    off = subprocess.run(CLI + ["score", str(dcm), "--out", str(tmp_path / "off"), "--no-red-cells", "--no-heatmaps",
                                "--threads", "1", "--quiet", "--no-run-log"], capture_output=True, text=True, timeout=600)
    assert off.returncode == 0, off.stderr
    assert "red_cells" not in json.loads((tmp_path / "off" / "results.json").read_text())["slides"][0]["summary"]
    timings = json.loads((out / "results.json").read_text())["run"]["timings_s"][str(dcm)]
    assert np.isfinite(timings["red_cells"]) and timings["red_cells"] > 0
