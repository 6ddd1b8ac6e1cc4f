"""End to end with the real model: `cytoedge submit --json` through a daemon scoring with SlideScorer
must print the same result document as a local `cytoedge score --json` (all but the "run" block,
which holds timings), cell for cell; an in-band tile gives the same cells as the file."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from cytoedge.runtime.cli import main
from cytoedge.runtime.service.client import ScannerLinkClient
from cytoedge.runtime.service.scorer_binding import SlideScorerFactory
from cytoedge.runtime.slide_scoring import ScoringOptions
from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear
from test_service_daemon import running_daemon

SCALE_KEYS = ("class", "probabilities", "runner_up", "flags", "nfe", "centre")


@pytest.fixture(scope="module")
def smear(bundle, ort_backend):
    return generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))


def test_submit_json_matches_local_score_json(tmp_path, bundle, smear, capsys):
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    slide = tmp_path / "slides" / "smear.png"
    blank = tmp_path / "slides" / "blank.png"  # no white cells: an error entry, worded the same both ways
    slide.parent.mkdir()
    cv2.imwrite(str(slide), smear.rgb[..., ::-1])
    cv2.imwrite(str(blank), np.full((200, 200, 3), 235, np.uint8))
    scale = ["--um-per-px", str(smear.um_per_px)]
    assert main(["score", str(slide), str(blank), "--out", str(tmp_path / "local"), "--json", "--no-heatmaps",
                 "--quiet", "--threads", "1", *scale]) == 1
    local = json.loads(capsys.readouterr().out)

    from cytoedge.models import red_cell_bundle_path
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.red_cells import RedCellSampling

    red = ModelBundle.load(red_cell_bundle_path())  # the daemon reads the red cells as `score` does by default
    factory = SlideScorerFactory(bundle, OnnxRuntimeBackend(bundle, threads=1), "fast", ScoringOptions(heatmaps=False),
                                 red_cells=(red, OnnxRuntimeBackend(red, threads=1), RedCellSampling()))
    with running_daemon(tmp_path, factory) as daemon:
        assert main(["submit", str(slide), str(blank), "--endpoint", daemon.endpoint, "--json", "--timeout", "60",
                     *scale]) == 1
        served = json.loads(capsys.readouterr().out)

        with ScannerLinkClient(daemon.endpoint, timeout_s=60) as client:
            job = client.open_stream("smear-in-band", um_per_px=smear.um_per_px)
            client.send_tile(job, 0, smear.rgb, (0, 0))
            client.end_of_slide(job, 1)
            in_band, summary = client.wait_result(job)

    assert local["slides"][0]["cells"], "the smear should have white cells"
    assert local["slides"][1]["status"] == "error"
    assert {k: v for k, v in served.items() if k != "run"} == {k: v for k, v in local.items() if k != "run"}
    local_cells = local["slides"][0]["cells"]
    assert [{k: c[k] for k in SCALE_KEYS} for c in in_band] == [{k: c[k] for k in SCALE_KEYS} for c in local_cells]
    assert summary["summary"]["counts"]["white_cells"] == len(local_cells)
