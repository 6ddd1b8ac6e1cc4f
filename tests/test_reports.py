"""Report writers on a scored generated smear: CSV rows match the cells, overlay and gallery PNGs,
a self-contained HTML page, DICOM Bulk Simple Annotations readable by highdicom."""
from __future__ import annotations

import csv
import json

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest

from cytoedge.runtime.reports import write_slide_reports
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, score_slide
from cytoedge.runtime.sources import open_source
from cytoedge.runtime.synthetic_smear import SmearSpec, frames_of, generate_smear, write_wsi_dicom


@pytest.fixture(scope="module")
def scored(bundle, ort_backend, tmp_path_factory):
    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=8, seed=5))
    folder = tmp_path_factory.mktemp("rep")
    h, w = smear.rgb.shape[:2]
    dcm = write_wsi_dicom(folder / "slide.dcm", frames_of(smear.rgb, 256), (w, h), 256, 0.2, codec="jpeg2000",
                          organisation="TILED_FULL")
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(tile_px=256))
    entry = score_slide(scorer, open_source(dcm))
    out = write_slide_reports(entry, scorer.audit, scorer.scored(), folder / "out", 0, dicom_source=True)
    return entry, out, scorer


def test_csv_has_one_row_per_cell(scored):
    entry, out, _ = scored
    rows = list(csv.DictReader(open(out["csv"])))
    assert [int(r["id"]) for r in rows] == [c["id"] for c in entry["cells"]]
    assert [r["class"] for r in rows] == [c["class"] for c in entry["cells"]]
    assert all(float(r["x1"]) > float(r["x0"]) for r in rows)


def test_images_and_html(scored):
    entry, out, scorer = scored
    overlay = cv2.imread(out["overlay"])
    assert overlay.shape[:2] == scorer.pictures.thumbnail.image.shape[:2]
    assert np.any(overlay != cv2.cvtColor(scorer.pictures.thumbnail.image, cv2.COLOR_RGB2BGR))  # boxes were drawn
    flagged = [c for c in entry["cells"] if any(c["flags"].get(k) for k in ("abnormal", "uncertain", "anomalous"))]
    assert sorted(scorer.pictures.explained) == [c["id"] for c in flagged][:len(scorer.pictures.explained)]
    assert sorted(scorer.pictures.views) == [c["id"] for c in entry["cells"]]  # every cell kept for review
    if flagged:  # a gallery exactly when some cell is flagged
        gallery = cv2.imread(out["gallery"])
        assert gallery is not None and gallery.std() > 0
    else:
        assert "gallery" not in out
    page = open(out["html"]).read()
    assert entry["summary"]["triage"]["level"].upper() in page
    assert "data:image/png;base64," in page and "http://" not in page and "https://" not in page


def test_dicom_annotations_reference_the_slide(scored):
    entry, out, _ = scored
    ann = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(pydicom.dcmread(out["dicom_annotations"]))
    source = pydicom.dcmread(entry["source"], stop_before_pixels=True)
    assert ann.StudyInstanceUID == source.StudyInstanceUID
    assert ann.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID
    groups = {g.label: g for g in ann.get_annotation_groups()}
    by_class = {k: v for k, v in entry["summary"]["by_class"].items() if v}
    assert {k: len(g.get_graphic_data(coordinate_type=ann.AnnotationCoordinateType)) for k, g in groups.items()} \
        == by_class
    first = entry["cells"][0]
    boxes = groups[first["class"]].get_graphic_data(coordinate_type=ann.AnnotationCoordinateType)
    assert any(np.allclose(b[0], first["bbox"][:2]) and np.allclose(b[2], first["bbox"][2:]) for b in boxes)


def test_report_for_a_failed_slide_says_why(tmp_path):
    entry = {"source": "x.dcm", "status": "error", "error": "x.dcm: not a readable DICOM file"}
    out = write_slide_reports(entry, {"model": "m"}, None, tmp_path, 3, dicom_source=False)
    assert "not a readable DICOM file" in open(out["html"]).read()
    assert list(csv.DictReader(open(out["csv"]))) == []
    assert json.dumps(out)
