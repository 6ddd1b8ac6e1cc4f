"""Whole-slide scoring end to end on a generated smear: tiles count each cell once, the same slide
gives the same records, in-band tiles, summary and triage, heatmaps, the result document and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from cytoedge.runtime.cells import crops_to_batch
from cytoedge.runtime.heatmap import counterfactual_heatmaps, heatmap_plan
from cytoedge.runtime.result_document import build_result_document
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, score_slide
from cytoedge.runtime.sources import open_source
from cytoedge.runtime.summary import TriagePolicy, triage
from cytoedge.runtime.synthetic_smear import SmearSpec, frames_of, generate_smear, write_wsi_dicom

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schemas" / "result-document.schema.json").read_text())


@pytest.fixture(scope="module")
def smear(bundle, ort_backend):
    return generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=8, seed=3))


@pytest.fixture(scope="module")
def smear_png(smear, tmp_path_factory):
    path = tmp_path_factory.mktemp("smear") / "smear.png"
    cv2.imwrite(str(path), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
    return path


def _centres(records):
    return np.array([r["centre"] for r in records]).reshape(-1, 2)


def test_tiled_dicom_finds_each_cell_once_like_the_whole_field(bundle, ort_backend, smear, smear_png, tmp_path):
    whole = list(SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False))
                 .score_source(open_source(smear_png, 0.2)))
    h, w = smear.rgb.shape[:2]
    dcm = write_wsi_dicom(tmp_path / "s.dcm", frames_of(smear.rgb, 128), (w, h), 128, 0.2, organisation="TILED_FULL")
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(tile_px=128, heatmaps=False, batch_cells=2))
    tiled = list(scorer.score_source(open_source(dcm)))
    assert scorer.tally.tiles > 4  # the cells (16 µm = 80 px) straddle the 128-px tile cores
    assert len(whole) >= 3 and len(tiled) == len(whole)
    a, b = _centres(whole), _centres(tiled)
    assert max(np.min(np.hypot(*(b - p).T)) for p in a) < 3.0
    assert [r["id"] for r in tiled] == list(range(len(tiled)))
    truth = np.array([t["centre"] for t in smear.truth])
    assert sum(np.min(np.hypot(*(b - t).T)) < 15 for t in truth) >= 3


def test_each_tile_is_resampled_once_and_each_cell_cut_once_per_view(bundle, ort_backend, smear, tmp_path):
    """The stage counts: a tile with cells is resampled once; the estimator cuts each cell once in each
    probe view, and the heatmaps of the flagged cells reuse those cuts instead of cutting again."""
    h, w = smear.rgb.shape[:2]
    dcm = write_wsi_dicom(tmp_path / "s.dcm", frames_of(smear.rgb, 128), (w, h), 128, 0.2, organisation="TILED_FULL")
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(tile_px=256, batch_cells=2,
                                                                     heatmap_cells="all"))
    entry = score_slide(scorer, open_source(dcm))
    counts = scorer.scored().counts
    views = {(p.angle, p.flip) for p in bundle.calibration.probes}
    cells = entry["cells"]
    tiles_with_cells = len({(c["centre"][0] // 256, c["centre"][1] // 256) for c in cells})
    assert counts["cells"] == len(cells) >= 3 and all("heatmap" in c for c in cells)
    assert counts["tiles_resampled"] == tiles_with_cells < counts["tiles"]
    assert counts["cell_cuts"] == len(cells) * len(views)
    assert counts["heatmap_cell_cuts"] == 0


def test_same_slide_twice_gives_identical_records(bundle, ort_backend, smear_png):
    opts = ScoringOptions(um_per_px=0.2)
    one = SlideScorer(bundle, ort_backend, "fast", opts)
    first = score_slide(one, open_source(smear_png, 0.2))
    second = score_slide(SlideScorer(bundle, ort_backend, "fast", opts), open_source(smear_png, 0.2))
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["status"] == "ok" and all(r["nfe"] > 0 for r in first["cells"])


def test_stain_map_is_fitted_once_per_slide_by_default_or_per_cell_on_request(bundle, ort_backend, smear_png):
    per_slide = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False))
    list(per_slide.score_source(open_source(smear_png, 0.2)))
    stain = per_slide.summary()["stain"]
    assert stain["context"] == "slide" and len(stain["fitted"]["mean"]) == 3
    per_cell = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False,
                                                                       stain_context="cell"))
    list(per_cell.score_source(open_source(smear_png, 0.2)))
    assert per_cell.summary()["stain"] == {"method": "reinhard", "context": "cell", "fitted": None,
                                           "left_as_scanned": False}
    off = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False, stain_normalise=False))
    list(off.score_source(open_source(smear_png, 0.2)))
    assert off.summary()["stain"] is None


def test_score_tile_reports_in_slide_coordinates(bundle, ort_backend, smear, smear_png):
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2, heatmaps=False))
    ref = list(scorer.score_source(open_source(smear_png, 0.2)))
    scorer.reset("in-band")
    got = scorer.score_tile(smear.rgb, (1000, 500), 0.2)
    assert [r["class"] for r in got] == [r["class"] for r in ref]
    np.testing.assert_allclose(_centres(got) - _centres(ref), np.tile([1000, 500], (len(got), 1)), atol=0.11)
    assert scorer.summary()["counts"]["white_cells"] == len(got)


def test_summary_document_and_heatmaps(bundle, ort_backend, smear_png):
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=0.2))
    entry = score_slide(scorer, open_source(smear_png, 0.2))
    s, cells = entry["summary"], entry["cells"]
    assert sum(s["by_class"].values()) == len(cells) == s["counts"]["white_cells"]
    assert np.sum(s["density_map"]["white"]) == len(cells)
    longest_um = max(s["width_px"], s["height_px"]) * s["scale"]["um_per_px"]
    assert s["density_map"]["bin_um"] == pytest.approx(min(max(longest_um / 16, 25.0), 200.0), rel=1e-3)
    assert max(s["density_map"]["rows"], s["density_map"]["cols"]) >= 3  # a grid, not one square
    assert {c["id"] for c in s["abnormal_cells"]} == {c["id"] for c in cells if c["flags"]["abnormal"]}
    assert s["triage"]["level"] in ("review", "urgent")  # 4 cells cannot make a differential
    assert any("white cells counted" in r for r in s["triage"]["reasons"])
    flagged = [c for c in cells if any(c["flags"].values())]
    assert all("heatmap" in c and c["id"] in scorer.pictures.heatmaps for c in flagged)
    doc = build_result_document(cells, s, {**scorer.audit, "source": str(smear_png)})
    jsonschema.validate(doc, SCHEMA)
    assert all(c["audit"]["bundle_sha256"] == bundle.sha256 for c in doc["slides"][0]["cells"])


def test_heatmap_is_zero_for_the_same_class_and_antisymmetric(bundle, ort_backend, rng):
    rgb = rng.integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    batch = crops_to_batch(list(rgb), bundle)
    plan = heatmap_plan(bundle)
    a, b = np.array([0, 3]), np.array([4, 6])
    same = counterfactual_heatmaps(batch, a, a, bundle, ort_backend, plan)
    assert same.shape == (2, bundle.input_size, bundle.input_size) and np.all(same == 0)
    ab = counterfactual_heatmaps(batch, a, b, bundle, ort_backend, plan)
    ba = counterfactual_heatmaps(batch, b, a, bundle, ort_backend, plan)
    np.testing.assert_allclose(ab, -ba, atol=1e-5)
    assert np.abs(ab).max() > 0


def test_heatmap_plan_follows_the_calibration_or_falls_back(bundle):
    import dataclasses

    plan = heatmap_plan(bundle)
    assert bundle.calibration.probes  # the bundled model is calibrated: its plan is the calibration's
    assert plan.source == "calibration"
    assert plan.timesteps.tolist() == [p.timestep for p in bundle.calibration.probes]
    bare = heatmap_plan(dataclasses.replace(bundle, calibration=None))
    assert bare.source == "fallback" and bare.noise.shape == (len(bare.timesteps), 3, bundle.input_size,
                                                              bundle.input_size)
    assert np.all((bare.timesteps > 0) & (bare.timesteps < bundle.schedule.num_train_timesteps))


def test_triage_levels_and_reasons():
    policy = TriagePolicy()
    normal = {"neutrophil": 0.6, "lymphocyte": 0.3, "monocyte": 0.06, "eosinophil": 0.03, "basophil": 0.01}
    assert triage({}, 200, 200, 0, 5, 0, normal, policy)["level"] == "routine"
    few = triage({}, 40, 40, 0, 0, 0, normal, policy)
    assert few["level"] == "review" and "40 white cells" in few["reasons"][0]
    urgent = triage({"ig": 12}, 200, 200, 12, 0, 0, normal, policy)
    assert urgent["level"] == "urgent" and "ig 12" in urgent["reasons"][0]
    skewed = triage({}, 200, 200, 0, 0, 0, {**normal, "lymphocyte": 0.6}, policy)
    assert skewed["level"] == "review" and any("lymphocyte 60.0%" in r for r in skewed["reasons"])


def _records_from_a_known_model(composition: dict[str, int], names: list[str], seed: int, posteriors) -> list[dict]:
    """Cells of a known model (``posteriors``: the conftest fixture): classes 10 apart except ig, 2 from
    neutrophils (whose flag then fires on one in six)."""
    means = 10.0 * np.arange(len(names))
    means[names.index("ig")] = means[names.index("neutrophil")] + 2.0
    y = np.concatenate([np.full(k, names.index(c)) for c, k in composition.items()])
    return [{"class": names[int(q.argmax())], "probabilities": dict(zip(names, q.tolist())),
             "flags": {"abnormal": names[int(q.argmax())] == "ig"}} for q in posteriors(y, means, seed)]


@pytest.mark.parametrize("ig,expected", [(0, "review"), (30, "urgent")])
def test_urgency_reads_the_corrected_abnormal_share_not_the_flag_count(ig, expected, known_posteriors):
    """200 cells of which ~1 in 6 neutrophils is called ig: the flag count alone makes every slide urgent."""
    from cytoedge.runtime.summary import corrected_shares

    names = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    records = _records_from_a_known_model({"neutrophil": 120 - ig, "lymphocyte": 60, "monocyte": 12, "eosinophil": 8,
                                           "ig": ig}, names, ig, known_posteriors)
    flagged = sum(r["flags"]["abnormal"] for r in records)
    differential = {c: sum(r["class"] == c for r in records) / 200 for c in names}
    by_count = triage({"ig": flagged}, 200, 200, flagged, 0, 0, differential,
                      TriagePolicy(urgent_abnormal_from="flagged"))
    assert flagged >= 10 and by_count["level"] == "urgent"
    corrected = corrected_shares(records, names, ["erythroblast", "ig"], resamples=50)
    lo, hi = corrected["abnormal"]["ci95_percent"]
    assert lo <= 100 * ig / 200 <= hi and corrected["abnormal"]["percent"] == pytest.approx(100 * ig / 200, abs=4)
    read = triage({"ig": flagged}, 200, 200, flagged, 0, 0, differential, TriagePolicy(), corrected["abnormal"])
    assert read["level"] == expected
    assert "once corrected for the model's confusions" in read["reasons"][0]


def test_cli_scores_good_slides_and_reports_bad_ones(smear_png, tmp_path, capsys):
    from cytoedge.runtime.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(smear_png.read_bytes()[:300])
    empty = tmp_path / "empty.png"
    cv2.imwrite(str(empty), np.full((400, 400, 3), 235, np.uint8))
    folder = tmp_path / "fields"
    folder.mkdir()
    (folder / "a.png").write_bytes(smear_png.read_bytes())
    (folder / "z.jpg").write_bytes(b"junk")
    code = main(["score", str(bad), str(smear_png), str(empty), str(folder), "--out", str(tmp_path / "out"),
                 "--um-per-px", "0.2", "--json", "--threads", "1", "--no-heatmaps"])
    assert code == 1
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, SCHEMA)
    status = {Path(s["source"]).name: s for s in doc["slides"]}
    assert status["broken.png"]["status"] == "error" and "broken.png" in status["broken.png"]["error"]
    assert status["empty.png"]["status"] == "error" and "no white cells" in status["empty.png"]["error"]
    assert status["smear.png"]["status"] == "ok" and status["smear.png"]["cells"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["slides"][1]["cells"]
    assert "timings_s" in doc["run"]
    fields = status["fields"]
    assert fields["status"] == "ok" and len(fields["cells"]) == len(status["smear.png"]["cells"])
    assert "z.jpg" in fields["summary"]["failures"][0]["error"]
    assert "overlay" not in doc["run"]["outputs"][str(folder)] and "overlay" in doc["run"]["outputs"][str(smear_png)]


def test_tiles_shrink_so_that_at_model_scale_they_stay_under_the_limit(bundle, ort_backend):
    """A coarse scale is upsampled to the model's: the scorer asks its source for smaller cores, so that
    no tile (overlap included) passes MAX_MODEL_SCALE_TILE_PIXELS; at a fine scale tile_px is kept."""
    from cytoedge.runtime.limits import MAX_MODEL_SCALE_TILE_PIXELS, UM_PER_PX_MAX, UM_PER_PX_MIN, model_scale_pixels
    from cytoedge.runtime.sources import Tile

    class Glass:
        """A blank plane that records the tile size it is asked for."""

        name, width, height = "glass", 64, 64

        def __init__(self, um_per_px: float):
            self.um_per_px, self.asked = um_per_px, []

        def tiles(self, tile_size, overlap):
            self.asked.append((tile_size, overlap))
            yield Tile(np.full((64, 64, 3), 255, np.uint8), 0, 0, (0, 0, 64, 64), self.name)

        def close(self):
            pass

    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(tile_px=12000, heatmaps=False))
    cores = {}
    for um in (UM_PER_PX_MIN, 0.2, 1.0, UM_PER_PX_MAX):
        glass = Glass(um)
        assert list(scorer.score_source(glass)) == []
        cores[um], overlap = glass.asked[-1]
        side = cores[um] + 2 * overlap
        assert model_scale_pixels(side, side, um, bundle.um_per_px) <= MAX_MODEL_SCALE_TILE_PIXELS
    assert cores[0.2] == 12000 and cores[UM_PER_PX_MAX] < 12000


@pytest.mark.parametrize("angle,flip", [(np.pi / 2, False), (np.pi / 2, True), (np.pi, False), (0.7, True)])
def test_unview_puts_a_probe_views_map_back_on_the_cell(bundle, rng, angle, flip):
    from cytoedge.kernels import prepare_batch
    from cytoedge.runtime.heatmap import unview

    size = bundle.input_size
    tile = cv2.GaussianBlur(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (0, 0), 2)
    cells = np.array([[0, 31.5, 31.5, 0.0, 0.0, 1.0], [0, 31.5, 31.5, angle, float(flip), 1.0]], np.float32)
    x, _ = prepare_batch([tile], cells, size)
    back = unview(x[1:, 0], angle, flip)[0]
    inner = slice(4, size - 4)  # a rotation by a non-right angle loses the corners
    right_angle = abs(angle / (np.pi / 2) - round(angle / (np.pi / 2))) < 1e-9
    # A right angle maps the pixel lattice onto itself (exact); another angle interpolates twice.
    np.testing.assert_allclose(back[inner, inner], x[0, 0][inner, inner], atol=1e-4 if right_angle else 0.1)
    assert not np.allclose(x[1, 0][inner, inner], x[0, 0][inner, inner], atol=0.1)  # the view did move it


def test_streamed_tiles_all_reach_the_thumbnail_within_its_size(bundle, ort_backend, smear):
    """Tiles sent in-band grow the slide: the thumbnail grows with them (shrinking what it holds) and keeps
    every tile, within ``thumbnail_px``."""
    rgb = smear.rgb
    h, w = rgb.shape[:2]
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(heatmaps=False, thumbnail_px=160))
    half = w // 2
    scorer.score_tile(np.ascontiguousarray(rgb[:, :half]), (0, 0), 0.2)
    scorer.score_tile(np.ascontiguousarray(rgb[:, half:]), (half, 0), 0.2)
    thumb = scorer.pictures.thumbnail.image
    assert max(thumb.shape[:2]) <= 160 and thumb.shape[1] == round(w * scorer.pictures.thumbnail.scale)
    expected = cv2.resize(rgb, (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_AREA)
    right = slice(thumb.shape[1] // 2 + 2, None)  # the second tile's part: blank before the fix
    assert np.abs(thumb[:, right].astype(int) - expected[:, right]).mean() < 12


def test_reference_records_say_not_assessed_and_triage_does_not_call_them_clean(bundle):
    """The reference protocol gives no anomaly score: its records say "not assessed" (null), and a slide
    of such cells is not routine, whatever its differential."""
    from cytoedge.runtime.result_document import cell_record
    from cytoedge.runtime.summary import SlideTally, summarise_slide

    names = bundle.class_names
    ref = {"class": "neutrophil", "scores": {n: 0.1 + i for i, n in enumerate(names)}, "survived": ["neutrophil"],
           "confidence_label": "uncalibrated", "nfe": 40, "estimator": "reference"}
    rec = cell_record(ref, bundle)
    assert rec["flags"] == {"abnormal": False, "uncertain": False, "anomalous": None}
    assert rec["runner_up"] == next(n for n in names if n != "neutrophil")  # the lowest error after the class
    records = [{**rec, "id": i, "centre": [10.0 * i, 5.0], "bbox": [0, 0, 1, 1]} for i in range(150)]
    s = summarise_slide(records, SlideTally("x", 2000, 100), None, None, bundle, TriagePolicy(), 200.0)
    assert s["counts"]["anomaly_not_assessed"] == 150 and s["anomalous_cells"] == []
    assert s["triage"]["level"] == "review"
    assert any("150 cells not assessed for anomaly" in r for r in s["triage"]["reasons"])
