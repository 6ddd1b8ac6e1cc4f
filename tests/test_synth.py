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
