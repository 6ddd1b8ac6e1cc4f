"""ICSH grading of a slide's red cells: grades at the published limits, the schistocyte urgency, the
exact intervals and a provisional small sample (pure, on hand-made counts)."""
from __future__ import annotations

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
