"""The out-of-domain alarm (fitted by calibration/domain.py, applied by runtime/domain_alarm.py): fitted
on calibration cells alone, quiet on runs drawn like them whatever their class mix, raised on a run whose
errors moved, and per cell two-sided."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.calibration.domain import fit_domain
from cytoedge.runtime.calibration_config import AnomalyNormalisation
from cytoedge.runtime.domain_alarm import records_alarm, run_alarm, typicality_scores


def errors(rng, n, classes=4, probes=3, shift=0.0):
    """Weighted leader and null errors of ``n`` cells whose levels depend on the class (as real ones do)."""
    y = rng.integers(0, classes, n)
    level = 0.05 * (1 + 0.3 * y)[:, None] * np.exp(rng.normal(shift, 0.15, (n, probes)))
    null = level * np.exp(rng.normal(0.15, 0.05, (n, probes)))  # the null class explains cells a little worse
    return level, null, y


NORMALISATION = AnomalyNormalisation("null_ratio", [-0.15] * 3, [0.05] * 3)


@pytest.fixture(scope="module")
def domain():
    leader, null, y = errors(np.random.default_rng(0), 1500)
    return fit_domain(leader, null, [f"c{k}" for k in y], NORMALISATION, seed=1)


def features(domain, leader, null, y):
    from cytoedge.runtime.decisions import anomaly_scores

    return anomaly_scores(leader, null, NORMALISATION), typicality_scores(leader, null, domain), [f"c{k}" for k in y]


def test_runs_like_the_calibration_cells_rarely_raise_it_whatever_their_mix(domain):
    rng = np.random.default_rng(5)
    raised = 0
    for k in range(200):
        leader, null, y = errors(rng, 50, classes=1 + k % 4)  # one class alone, two, three, all four
        raised += run_alarm(*features(domain, leader, null, y), domain)["raised"]
    assert raised <= 0.05 * 200


def test_a_run_whose_errors_moved_raises_it_with_the_reason(domain):
    leader, null, y = errors(np.random.default_rng(6), 50, shift=0.6)  # another stain: every error 80 % larger
    verdict = run_alarm(*features(domain, leader, null, y), domain)
    assert verdict["raised"] and verdict["shift"] > verdict["threshold"]
    assert "unreliable until the site is adapted" in verdict["reason"]


def test_too_few_cells_or_no_reference_is_not_assessed(domain):
    leader, null, y = errors(np.random.default_rng(7), 5, shift=2.0)
    assert run_alarm(*features(domain, leader, null, y), domain) == {
        "assessed": False, "raised": False, "cells": 5, "reason": "fewer than 10 cells"}
    assert not run_alarm(np.zeros(40), np.zeros(40), ["c0"] * 40, None)["assessed"]


def test_cells_with_nothing_to_denoise_or_too_much_are_atypical(domain):
    from cytoedge.runtime.domain_alarm import atypical

    leader, null, _ = errors(np.random.default_rng(8), 3)
    blank, noise = leader * 1e-3, leader * 1e2
    z = typicality_scores(np.concatenate([leader, blank, noise]), np.concatenate([null, blank, noise]), domain)
    assert list(atypical(z, domain)) == [False] * 3 + [True] * 6


def test_records_the_estimator_did_not_assess_do_not_count(domain):
    assessed = [{"class": "c1", "anomaly_score": 0.0, "typicality": 0.0}] * 12
    assert records_alarm(assessed + [{"class": "c1", "anomaly_score": None}] * 30, domain)["cells"] == 12


def test_classify_of_foreign_crops_raises_the_alarm_and_labels_none_confident(bundle, tmp_path, capsys):
    """Twelve crops of noise through `cytoedge classify`: each atypical, the run's alarm raised with
    its reason on stderr and in the JSON, and no cell labelled confident."""
    import json

    from cytoedge.runtime.cells import write_image_with_scale
    from cytoedge.runtime.cli import main

    rng = np.random.default_rng(3)
    paths = []
    for k in range(12):
        path = tmp_path / f"noise{k:02d}.png"
        write_image_with_scale(path, rng.integers(0, 256, (96, 96, 3), dtype=np.uint8), 0.2)
        paths.append(str(path))
    assert main(["classify", *paths, "--json", "--threads", "1"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["domain_alarm"]["raised"] and "unreliable until the site is adapted" in out.err
    assert all(r["flags"]["atypical"] and r["flags"]["anomalous"] for r in doc["results"])
    assert not any(r["estimator_detail"]["confidence_label"] == "confident" for r in doc["results"])


def test_a_slide_that_raises_the_alarm_is_triaged_review_with_the_reason(bundle, ort_backend):
    """Cells drawn by the model itself are smoother and more class-typical than scanned ones: the
    slide's alarm is raised, triage says why first, and every record is marked out of domain."""
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, slide_entry
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=16, ddim_steps=8, seed=5))
    scorer = SlideScorer(bundle, ort_backend, "fast", ScoringOptions(um_per_px=smear.um_per_px, heatmaps=False))
    records = scorer.score_tile(smear.rgb, (0, 0), smear.um_per_px)
    summary = scorer.summary()
    assert summary["domain_alarm"]["raised"] and summary["domain_alarm"]["cells"] == len(records) >= 10
    assert summary["triage"]["level"] == "review"
    assert summary["triage"]["reasons"][0].startswith("cells unlike this model's training data")
    entry = slide_entry("smear", records, summary)
    assert all(c["flags"]["out_of_domain"] for c in entry["cells"])
    assert not any((c.get("estimator_detail") or {}).get("confidence_label") == "confident" for c in entry["cells"])


def test_a_late_probe_few_cells_reach_does_not_make_their_typicality_explode():
    """The race stops most cells early, so the last probes' errors exist for a few calibration cells only.
    Their spread cannot be measured from one cell (std 0): the probe takes the other probes' spread, and a
    run cell that reaches it gets an ordinary z, not millions."""
    rng = np.random.default_rng(2)
    leader, null, y = errors(rng, 600)
    leader[1:, 2] = null[1:, 2] = np.nan  # one calibration cell ran the third probe
    reference = fit_domain(leader, null, [f"c{k}" for k in y], NORMALISATION, seed=1)
    spread = reference["typicality"]["std"]
    assert spread[2] == pytest.approx(np.median(spread[:2]), rel=1e-6)
    run_leader, run_null, run_y = errors(np.random.default_rng(3), 60)
    z = typicality_scores(run_leader, run_null, reference)
    assert np.all(np.abs(z) < 10)
    assert not run_alarm(*features(reference, run_leader, run_null, run_y), reference)["raised"]


def test_a_reference_from_few_cells_does_not_alarm_on_large_runs_of_new_cells_like_them():
    """The per-class means of a reference fitted on a few dozen cells a class are off by a fraction of a
    standard deviation, and a run of 200 new cells measures its mean that precisely: thresholds from runs
    of the calibration cells against the one fitted reference raised the alarm on 13 % of such runs here
    (and on one slide in five of 200 held-out PBC cells). New cells from the same distribution must
    rarely raise it."""
    leader, null, y = errors(np.random.default_rng(11), 120)  # 30 cells a class
    reference = fit_domain(leader, null, [f"c{k}" for k in y], NORMALISATION, seed=1)
    raised = sum(run_alarm(*features(reference, *errors(np.random.default_rng(100 + k), 200)), reference)["raised"]
                 for k in range(100))
    assert raised <= 3
