"""ICSH grading of a slide's red cells: grades at the published limits, the schistocyte urgency, the
exact intervals and a provisional small sample (pure, on hand-made counts)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta

from cytoedge.calibration.icsh_grading import icsh_grading
from cytoedge.runtime.intervals import exact_interval
from cytoedge.runtime.rbc_grading import grade, red_cell_reading

CLASSES = ["normal", "macrocyte", "microcyte", "spherocyte", "target_cell", "stomatocyte", "ovalocyte", "teardrop",
           "burr_cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte"]
GRADING = icsh_grading(CLASSES)


@pytest.mark.parametrize("cls,percent,expected", [
    ("target_cell", 4.9, "0"), ("target_cell", 5.0, "1+"), ("target_cell", 20.0, "1+"), ("target_cell", 20.1, "2+"),
    ("target_cell", 50.0, "2+"), ("target_cell", 50.1, "3+"),
    ("macrocyte", 10.9, "0"), ("macrocyte", 11.0, "1+"), ("macrocyte", 25.0, "2+"), ("macrocyte", 60.0, "3+"),
    ("schistocyte", 0.1, "1+"), ("schistocyte", 0.99, "1+"), ("schistocyte", 1.0, "2+"), ("schistocyte", 2.0, "2+"),
    ("schistocyte", 2.01, "3+"),
])
def test_grades_follow_each_features_published_ranges(cls, percent, expected):
    assert grade(percent, 1, GRADING["features"][cls]["grade_starts_percent"]) == expected


def test_no_cell_of_a_feature_is_grade_0_even_where_1_plus_starts_at_zero():
    assert grade(0.0, 0, GRADING["features"]["schistocyte"]["grade_starts_percent"]) == "0"


def test_exactly_one_percent_schistocytes_is_2_plus_and_asks_for_review():
    reading = red_cell_reading({**{c: 0 for c in CLASSES}, "normal": 990, "schistocyte": 10}, GRADING)
    assert reading["grades"]["schistocytes"]["grade"] == "2+" and reading["triage"]["level"] == "review"


def test_schistocytes_above_one_percent_make_the_slide_urgent_with_the_reason():
    counts = {c: 0 for c in CLASSES}
    counts.update(normal=960, schistocyte=25, target_cell=15)
    reading = red_cell_reading(counts, GRADING)
    assert reading["red_cells_classified"] == 1000 and not reading["provisional"]
    assert reading["grades"]["schistocytes"]["grade"] == "3+" and reading["grades"]["target cells"]["grade"] == "0"
    assert reading["triage"]["level"] == "urgent"
    assert reading["triage"]["reasons"][0].startswith("schistocytes 2.5 % of 1000 red cells")
    lo, hi = exact_interval(25, 1000)
    assert reading["by_class"]["schistocyte"]["ci95_percent"] == [round(100 * lo, 3), round(100 * hi, 3)]


def test_a_2_plus_feature_asks_for_review_and_a_small_sample_is_provisional():
    counts = {c: 0 for c in CLASSES}
    counts.update(normal=300, spherocyte=100)
    reading = red_cell_reading(counts, GRADING)
    assert reading["grades"]["spherocytes"]["grade"] == "2+" and reading["triage"]["level"] == "review"
    assert reading["provisional"] and any("provisional" in r for r in reading["triage"]["reasons"])
    steady = red_cell_reading({**{c: 0 for c in CLASSES}, "normal": 1200, "ovalocyte": 30}, GRADING)
    assert steady["triage"] == {"level": "routine", "reasons": []}  # ovalocytes 2.4 %: below 1+


def test_exact_interval_is_clopper_pearson():
    lo, hi = exact_interval(5, 100)
    assert lo == pytest.approx(beta.ppf(0.025, 5, 96)) and hi == pytest.approx(beta.ppf(0.975, 6, 95))
    assert exact_interval(0, 50)[0] == 0.0 and exact_interval(50, 50)[1] == 1.0


def test_the_grading_artefact_names_its_sources_and_maps_only_the_bundles_classes():
    g = icsh_grading(["normal", "schistocyte", "spherocyte"])
    assert set(g["features"]) == {"schistocyte", "spherocyte"} and g["urgent"]["class"] == "schistocyte"
    assert "Palmer" in g["provenance"]["grading"] and "Zini" in g["provenance"]["schistocytes"]
    assert icsh_grading(["normal", "spherocyte"])["urgent"] is None


@pytest.fixture
def calibrated_slide(known_posteriors):
    """Counts and exact posteriors of a slide drawn from a known model: classes 10 apart except
    schistocytes, 2 from spherocytes (which the model then calls schistocytes one time in six)."""
    means = 10.0 * np.arange(len(CLASSES))
    means[CLASSES.index("schistocyte")] = means[CLASSES.index("spherocyte")] + 2.0

    def draw(composition: dict[str, int], seed: int = 0):
        y = np.concatenate([np.full(k, CLASSES.index(c)) for c, k in composition.items()])
        p = known_posteriors(y, means, seed)
        called = np.bincount(p.argmax(1), minlength=len(CLASSES))
        return {c: int(k) for c, k in zip(CLASSES, called)}, p
    return draw


def test_schistocytes_called_on_a_spherocytic_slide_are_corrected_away_and_sent_to_review(calibrated_slide):
    counts, p = calibrated_slide({"normal": 700, "spherocyte": 300})
    assert counts["schistocyte"] > 10  # called on > 1 %: urgent from the counts alone
    assert red_cell_reading(counts, {**GRADING, "share_estimate": None})["triage"]["level"] == "urgent"
    reading = red_cell_reading(counts, GRADING, p)
    schisto = reading["grades"]["schistocytes"]
    assert schisto["adjusted_percent"] < 0.5 < 1.0 < schisto["percent"]
    assert reading["by_class"]["spherocyte"]["adjusted_percent"] == pytest.approx(30.0, abs=2.0)
    assert reading["grades"]["spherocytes"]["grade"] == "2+"  # 30 % corrected (called ~25 %: 2+ as well)
    assert reading["triage"]["level"] == "review"
    first = reading["triage"]["reasons"][0]
    assert first.startswith("schistocytes called on") and "review the schistocyte calls" in first
    assert reading["shares"].startswith("corrected")


def test_true_schistocytes_stay_urgent_once_corrected(calibrated_slide):
    counts, p = calibrated_slide({"normal": 960, "schistocyte": 30, "spherocyte": 10}, seed=1)
    reading = red_cell_reading(counts, GRADING, p)
    schisto = reading["grades"]["schistocytes"]
    lo, hi = schisto["adjusted_ci95_percent"]
    assert 2.0 < schisto["adjusted_percent"] < 4.0 and lo < 3.0 < hi
    assert reading["triage"]["level"] == "urgent"
    first = reading["triage"]["reasons"][0]
    assert first.startswith(f"schistocytes {schisto['adjusted_percent']:.1f} % of 1000 red cells, corrected")
    assert f"called on {schisto['percent']:.1f} %" in first


def test_probabilities_of_another_class_count_are_refused(calibrated_slide):
    counts, p = calibrated_slide({"normal": 50})
    with pytest.raises(ValueError, match="12 classes"):
        red_cell_reading(counts, GRADING, np.asarray(p)[:, :12])
    with pytest.raises(ValueError, match="probabilities of 49 cells for counts of 50"):
        red_cell_reading(counts, GRADING, np.asarray(p)[:49])


def test_a_corrected_share_is_graded_as_it_is_not_as_whole_cells(monkeypatch):
    """20.04 % target cells of 1,000 is above 2+'s "above 20 %" start; rounded to 200 cells it would be 1+."""
    import cytoedge.runtime.rbc_grading as rg

    assert GRADING["features"]["target_cell"]["grade_starts_percent"]["2+"] == {"above": 20.0}
    shares = {**{c: (0.0, [0.0, 0.1]) for c in CLASSES}, "normal": (79.96, [78.0, 82.0]),
              "target_cell": (20.04, [18.0, 22.0])}
    monkeypatch.setattr(rg, "_adjusted", lambda names, p, estimate: shares)
    counts = {**{c: 0 for c in CLASSES}, "normal": 800, "target_cell": 200}
    reading = red_cell_reading(counts, GRADING, np.full((1000, len(CLASSES)), 1 / len(CLASSES)))
    assert reading["grades"]["target cells"]["grade"] == "2+"


@pytest.mark.parametrize("change,field", [
    (lambda g: g.update(review_grade="4+"), "review_grade"),
    (lambda g: g["features"]["schistocyte"]["grade_starts_percent"].update({"2+": {"from": 1.0}}),
     "features.schistocyte.grade_starts_percent.2+"),
    (lambda g: g["features"]["spherocyte"]["grade_starts_percent"].update({"1+": {"at_least": 500}}),
     "features.spherocyte.grade_starts_percent.1+"),
    (lambda g: g["urgent"].update({"class": "blast"}), "urgent.class"),
    (lambda g: g["share_estimate"]["interval"].update(bootstrap_resamples=0), "share_estimate.interval.bootstrap_resamples"),
    (lambda g: g.update(min_red_cells="1000"), "min_red_cells"),
])
def test_a_red_cell_bundle_with_a_broken_grading_table_is_refused_naming_the_field(tmp_path, change, field):
    import json
    import re
    import shutil

    from cytoedge.models import red_cell_bundle_path
    from cytoedge.runtime.bundle import BundleError, ModelBundle, write_manifest

    path = tmp_path / "rbc"
    shutil.copytree(red_cell_bundle_path(), path)
    bundle = ModelBundle.load(path)
    grading = json.loads(json.dumps(bundle.grading))
    change(grading)
    (path / "grading.json").write_text(json.dumps(grading))
    manifest = bundle.manifest
    manifest["files"]["grading.json"] = {"sha256": ""}
    write_manifest(path, manifest)
    with pytest.raises(BundleError, match=re.escape(f"grading.json: field '{field}'")):
        ModelBundle.load(path)
