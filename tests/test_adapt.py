"""`cytoedge adapt`: per-class error offsets in the race, the site fit on synthetic errors with a known
answer, and the command run as a user runs it on cells the bundled model draws, recoloured as another
lab's stain would."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.calibration.fit import fit_calibration, offline_race
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.estimator import RaceSettings, run_race
from test_cli_commands import cytoedge, folder_digest, no_traceback

CLASSES = ["a", "b", "c", "d"]


def test_class_offsets_move_the_race_but_not_the_measured_errors():
    """An offset on a class's error decides the race; the leader's errors handed to the anomaly score stay
    as measured (weighted), so an adapted bundle's anomaly statistics are of real errors."""
    table = np.array([[[1.0, 1.0], [1.1, 1.1]]])  # one cell, class 0 better at both probes
    w = np.array([1.0, 2.0])
    plain = run_race(1, 2, RaceSettings(w, np.full(2, 10.0)), lambda c, k, j: table[c, k, j])
    assert plain.gaps.argmin(1)[0] == 0
    shifted = run_race(1, 2, RaceSettings(w, np.full(2, 10.0), np.array([[0.2, 0.2], [0.0, 0.0]])),
                       lambda c, k, j: table[c, k, j])
    assert shifted.gaps.argmin(1)[0] == 1
    np.testing.assert_allclose(shifted.gaps[0, 0], (1.2 - 1.1) * 3.0)  # (1.2·1 + 1.2·2) − (1.1·1 + 1.1·2)
    np.testing.assert_allclose(shifted.leader_errors[0], w * 1.1)
    with pytest.raises(CalibrationError, match="class offsets"):
        RaceSettings(w, np.full(2, 1.0), np.zeros((2, 3)))


def site_errors(rng, n=300, bias=0.5):
    """Errors of a labelled site where class c's denoiser is systematically ``bias`` better on every cell
    (as a class conditioned on another lab's stain can be), and only classes a, b, c are labelled."""
    y = rng.integers(0, 3, n)
    E = np.abs(rng.normal(1.0, 0.1, (n, 4, 6)))
    E[np.arange(n), y, :] -= 0.3
    E[:, 2, :] -= bias
    return E, y


def test_site_fit_learns_the_offset_of_a_class_that_wins_everything(rng):
    source = as_source(fit_calibration(*reference_errors(rng), CLASSES, ["d"]))
    E, y = site_errors(rng)
    fitted = fit_calibration(E, y, CLASSES, ["d"], site_of=source)
    chosen = fitted["chosen_candidates"]
    offsets = np.asarray(fitted["class_offsets"])
    assert offsets.shape == (4, len(chosen))
    # Offsets act relative to each other (a shift common to all classes cancels): c's advantage is taken back.
    assert np.all(offsets[2] - offsets[:2].mean(0) > 0.3)
    assert fitted["labelled_classes"] == ["a", "b", "c"]
    assert fitted["abnormal_threshold"] == source.thresholds.abnormal  # no d cell: kept from the source
    E_new, y_new = site_errors(np.random.default_rng(1))
    race = offline_race(E_new[:, :, chosen], RaceSettings(np.asarray(fitted["probe_weights"]),
                                                         np.asarray(fitted["elimination_margins"]), offsets))
    before = offline_race(E_new[:, :, chosen], RaceSettings(np.asarray(fitted["probe_weights"]),
                                                           np.asarray(fitted["elimination_margins"])))
    assert (before.gaps.argmin(1) == y_new).mean() < 0.5  # c wins nearly everything unadapted
    assert (race.gaps.argmin(1) == y_new).mean() > 0.95


def as_source(fitted: dict):
    """A fit as a source bundle's calibration (one candidate probe per error column, 1000-step schedule)."""
    from cytoedge.calibration.artefact import candidate_probes, fitted_calibration

    return fitted_calibration(fitted, candidate_probes([100, 200, 300, 400, 500, 600], 1), 0, {}, len(CLASSES),
                              1000, "source")


def reference_errors(rng, n=400):
    y = rng.integers(0, 4, n)
    E = np.abs(rng.normal(1.0, 0.1, (n, 4, 6)))
    E[np.arange(n), y, :] -= 0.3
    return E, y


def test_site_fit_refuses_a_single_class(rng):
    source = as_source(fit_calibration(*reference_errors(rng), CLASSES, ["d"]))
    E, y = site_errors(rng)
    with pytest.raises(CalibrationError, match="at least two"):
        fit_calibration(E, np.zeros_like(y), CLASSES, ["d"], site_of=source)


# --- the command -------------------------------------------------------------------------------------------------

SITE_CLASSES = ("eosinophil", "lymphocyte", "neutrophil")


def restain(rgb: np.ndarray) -> np.ndarray:
    """Another lab's stain, roughly: bluer and paler (a fixed map in LAB)."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    lab[..., 0] = np.clip(lab[..., 0] * 0.9 + 25, 0, 255)
    lab[..., 2] = np.clip(lab[..., 2] - 12, 0, 255)
    return cv2.cvtColor(lab.astype(np.uint8), cv2.COLOR_LAB2RGB)


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory, bundle, ort_backend) -> Path:
    """Six drawn cells of each of three classes, recoloured, as crops in DIR/<class>/<image>."""
    from cytoedge.runtime.cells import write_image_with_scale
    from cytoedge.runtime.sampler import ddim_sample

    per_class = 6
    ids = [bundle.class_names.index(c) for c in SITE_CLASSES]
    labels = np.repeat(ids, per_class)
    images = ddim_sample(bundle, ort_backend, labels, steps=12, seed=23)
    factor = float(bundle.manifest["input"].get("source_px_per_model_px", 1.0))
    root = tmp_path_factory.mktemp("site")
    for k, (im, c) in enumerate(zip(images, labels)):
        folder = root / bundle.class_names[c]
        folder.mkdir(exist_ok=True)
        big = cv2.resize(restain(im), None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        write_image_with_scale(folder / f"cell{k:02d}.png", big, bundle.um_per_px / factor)
    return root


def test_adapt_writes_a_new_valid_bundle_and_leaves_the_source_alone(bundle, site_folder, tmp_path):
    before = folder_digest(bundle.path)
    out = tmp_path / "adapted"
    run = cytoedge("adapt", "--data", site_folder, "--model", bundle.path, "--out", out, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 0, run.stderr
    assert f"adapted {bundle.name} to {site_folder}: 18 cells of 3 classes" in run.stdout
    assert "held part (" in run.stdout and f"-> {out}" in run.stdout
    assert folder_digest(bundle.path) == before
    adapted = ModelBundle.load(out)  # validation and every hash
    a = adapted.manifest["adaptation"]
    assert a["source_bundle_sha256"] == bundle.sha256 and a["method"] == "features" and a["input"] == "crops"
    assert a["cells"] == {c: 6 for c in SITE_CLASSES} and len(a["data_sha256"]) == 64
    assert "denoiser_int8" not in adapted.manifest["networks"] and not (out / "denoiser_int8.onnx").exists()
    cal = adapted.calibration
    assert cal.labelled_classes == SITE_CLASSES
    assert cal.class_offsets.shape == (len(bundle.class_names), len(cal.probes))
    assert adapted.domain["provenance"]["part"].startswith("B of the adaptation")
    # The class mixes the abstention threshold was checked under, and what it read, are in the artefact.
    from cytoedge.calibration.abstention import HELD_MIX, SMEAR_MIX
    from cytoedge.runtime.summary import TriagePolicy

    floor = cal.settings["site_prevalence_floor"]
    smear = TriagePolicy.from_bundle(bundle).expected_differential(bundle.class_names, floor)
    mixes = cal.settings["site_prevalences"]
    assert set(mixes) == {HELD_MIX, SMEAR_MIX} and "triage policy" in cal.settings["site_prevalence_source"]
    assert mixes[SMEAR_MIX] == pytest.approx({c: smear[c] / sum(smear[c] for c in SITE_CLASSES)
                                              for c in SITE_CLASSES}, abs=1e-4)
    assert [c["prevalence"] for c in cal.abstention_check] == [HELD_MIX, SMEAR_MIX]
    assert a["abstention_check"] == list(cal.abstention_check)
    assert all(f"  {name} (" in run.stdout for name in mixes)
    crop = sorted(site_folder.rglob("*.png"))[0]
    classified = cytoedge("classify", crop, "--model", out, "--json", "--threads", "1")
    assert classified.returncode == 0, classified.stderr
    doc = json.loads(classified.stdout)
    assert doc["bundle_sha256"] == adapted.sha256 and doc["results"][0]["class"] in bundle.class_names


@pytest.mark.parametrize("case", ["too few", "one class", "unknown class", "unbalanced", "out exists"])
def test_adapt_refuses_data_it_cannot_adapt_on_in_one_line(bundle, site_folder, tmp_path, case):
    data = tmp_path / "data"
    shutil.copytree(site_folder, data)
    out = tmp_path / "out"
    expect = {"too few": "too few labelled cells in lymphocyte (3)", "one class": "at least two classes",
              "unknown class": "are not classes of", "unbalanced": "more than 10x apart",
              "out exists": "already exists"}[case]
    if case == "too few":
        for f in sorted((data / "lymphocyte").iterdir())[3:]:
            f.unlink()
    elif case == "one class":
        shutil.rmtree(data / "lymphocyte")
        shutil.rmtree(data / "neutrophil")
    elif case == "unknown class":
        (data / "macrophage").mkdir()
    elif case == "unbalanced":
        src = sorted((data / "neutrophil").iterdir())
        for k in range(60):
            shutil.copy(src[k % len(src)], data / "neutrophil" / f"copy{k:02d}.png")
    else:
        out.mkdir()
        (out / "keep.txt").write_text("a lab's file")
    run = cytoedge("adapt", "--data", data, "--model", bundle.path, "--out", out, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 2, run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("cytoedge adapt:")]
    assert len(errors) == 1 and expect in errors[0], run.stderr
    if case == "out exists":
        assert (out / "keep.txt").read_text() == "a lab's file"
    else:
        assert not out.exists()


def test_a_site_the_errors_cannot_separate_is_called_uncertain_not_confident(rng):
    """Labels unrelated to the errors (a site whose cells the model cannot read): the adapted calibration
    abstains on most cells instead of capping abstention as the source's fit does."""
    source = as_source(fit_calibration(*reference_errors(rng), CLASSES, ["d"]))
    E = np.abs(rng.normal(1.0, 0.1, (300, 4, 6)))
    y = rng.integers(0, 3, 300)
    fitted = fit_calibration(E, y, CLASSES, ["d"], site_of=source)
    chosen = fitted["chosen_candidates"]
    race = offline_race(E[:, :, chosen], RaceSettings(np.asarray(fitted["probe_weights"]),
                                                      np.asarray(fitted["elimination_margins"]),
                                                      np.asarray(fitted["class_offsets"])))
    confident = race.probabilities(fitted["temperature"]).max(1) >= fitted["abstention_threshold"]
    assert confident.mean() < 0.15


def two_class_probabilities(conf: np.ndarray, y: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Probabilities ``[N, 2]`` whose top class has probability ``conf`` and is ``y`` where ``right``."""
    pred = np.where(right, y, 1 - y)
    p = np.empty((len(y), 2))
    p[np.arange(len(y)), pred] = conf
    p[np.arange(len(y)), 1 - pred] = 1 - conf
    return p


def test_the_abstention_threshold_must_hold_under_a_skewed_mix_too():
    """A balanced held part where class 0 is always right and class 1 right about as often as its top
    probability: the balanced mix passes at τ, a smear of mostly class 1 does not, so the threshold that
    holds under both is higher, and it does hold there."""
    from cytoedge.calibration.abstention import abstention_threshold, prevalence_weights, weighted_accuracy

    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 200)
    conf = rng.uniform(0.5, 1.0, len(y))
    right = (y == 0) | (rng.uniform(size=len(y)) < conf)
    p = two_class_probabilities(conf, y, right)
    skewed = np.array([0.1, 0.9])
    target, confidence = 0.9, 0.9

    def bound(tau, prevalence):
        kept = conf >= tau
        w = np.ones(len(y)) if prevalence is None else prevalence_weights(y, prevalence)
        return weighted_accuracy(right[kept], w[kept], confidence)[0]

    balanced = abstention_threshold(p, y, target, 1.0, confidence)
    both = abstention_threshold(p, y, target, 1.0, confidence, [skewed])
    assert bound(balanced, None) >= target > bound(balanced, skewed)
    assert both > balanced
    assert bound(both, None) >= target and bound(both, skewed) >= target
    assert both <= conf.max()  # some cells are still kept


def test_when_every_class_is_read_alike_the_mix_changes_nothing():
    """Each class the same cells (right ones spread over high probabilities, wrong ones at one lower
    value): reweighting to any mix leaves every kept set's accuracy as it is, and the threshold is the one
    the held part's own mix gives."""
    from cytoedge.calibration.abstention import abstention_threshold, prevalence_weights, weighted_accuracy

    rng = np.random.default_rng(6)
    per_class = np.concatenate([rng.uniform(0.6, 1.0, 80), np.full(20, 0.55)])
    k = 3
    y = np.repeat(np.arange(k), len(per_class))
    conf = np.tile(per_class, k)
    right = np.tile(np.arange(len(per_class)) < 80, k)
    pred = np.where(right, y, (y + 1) % k)
    p = np.tile(((1 - conf) / (k - 1))[:, None], (1, k))
    p[np.arange(len(y)), pred] = conf
    mix = np.array([0.8, 0.15, 0.05])
    w = prevalence_weights(y, mix)
    for tau in np.unique(conf):
        kept = conf >= tau
        assert np.isclose(weighted_accuracy(right[kept], w[kept], None)[0], right[kept].mean())
    for confidence in (None, 0.9):
        assert (abstention_threshold(p, y, 0.9, 1.0, confidence, [mix])
                == abstention_threshold(p, y, 0.9, 1.0, confidence))


def test_a_held_part_too_small_to_certify_any_threshold_keeps_no_cell_at_all():
    """Six held cells, all right, cannot bound the accuracy at 0.9: the threshold lies above 1, so the
    bundle's later cells, whatever their probability, are not labelled confident either."""
    from cytoedge.calibration.abstention import abstention_threshold, weighted_accuracy

    y = np.array([0, 0, 0, 1, 1, 1])
    conf = np.linspace(0.6, 0.9, 6)
    p = two_class_probabilities(conf, y, np.ones(6, bool))
    assert weighted_accuracy(np.ones(6, bool), np.ones(6), 0.9)[0] < 0.9
    assert abstention_threshold(p, y, 0.9, 1.0, 0.9) > 1.0
    assert abstention_threshold(p, y, 0.9, 1.0) == 0.0  # the point estimate (the source fit's) keeps them


def test_the_smear_mix_is_the_triage_ranges_midpoints_with_a_floor_over_the_labelled_classes():
    from cytoedge.calibration.abstention import HELD_MIX, SMEAR_MIX, site_prevalence_set
    from cytoedge.runtime.summary import TriagePolicy

    names = ["ig", "lymphocyte", "monocyte", "neutrophil"]
    y = np.repeat([0, 1, 3], [4, 4, 8])  # no monocyte labelled
    for triage in (None, {"differential_ranges": {"neutrophil": [0.8, 1.0], "lymphocyte": [0.0, 0.1]}}):
        policy = TriagePolicy.from_overrides(triage)
        raw = {c: max(sum(policy.differential_ranges.get(c, [0, 0])) / 2, 0.02) for c in ("ig", "lymphocyte", "neutrophil")}
        mixes = site_prevalence_set(y, names, triage, 0.02)
        assert mixes[HELD_MIX] == {"ig": 0.25, "lymphocyte": 0.25, "neutrophil": 0.5}
        assert mixes[SMEAR_MIX] == pytest.approx({c: v / sum(raw.values()) for c, v in raw.items()}, abs=1e-4)
    assert mixes[SMEAR_MIX]["neutrophil"] > 0.8
    with pytest.raises(CalibrationError, match="site_prevalence_floor"):
        site_prevalence_set(y, names, None, 0.0)


def test_cell_windows_are_centred_on_the_cell_and_reflected_at_tile_edges():
    from cytoedge.kernels import cell_table
    from cytoedge.runtime.cells import CellBatch
    from cytoedge.training.site_finetune import cell_windows

    tile = np.zeros((40, 50, 3), np.uint8)
    tile[4:6, 44:46] = 255  # a 2x2 "cell" whose centre is the pixel corner (45, 5): an even input's lattice
    windows = cell_windows([CellBatch([tile], cell_table(np.zeros(1), np.array([44.5]), np.array([4.5])))], size=20)
    assert windows.shape == (1, 20, 20, 3)
    bright = np.argwhere(windows[0, :, :, 0] == 255)
    assert {tuple(p) for p in bright} >= {(9, 9), (9, 10), (10, 9), (10, 10)}  # the cell at the window's centre


def test_adapt_finetune_trains_the_network_and_records_it(bundle, site_folder, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "finetuned"
    run = cytoedge("adapt", "--data", site_folder, "--model", bundle.path, "--out", out, "--method", "finetune",
                   "--steps", "3", "--threads", "1")
    no_traceback(run)
    assert run.returncode == 0, run.stderr
    assert "method finetune" in run.stdout and "not measured before" in run.stdout
    adapted = ModelBundle.load(out)
    ft = adapted.manifest["adaptation"]["finetune"]
    assert ft["steps"] == 3 and ft["cells"] < 18 and ft["export_max_abs_error_vs_torch"] < 1e-3  # part A only
    source_hash = bundle.manifest["files"]["denoiser.onnx"]["sha256"]
    assert adapted.manifest["files"]["denoiser.onnx"]["sha256"] != source_hash
    assert adapted.calibration.provenance["command"] == "cytoedge adapt --method finetune"


def test_adapt_on_fields_reads_them_as_score_does(bundle, ort_backend, tmp_path):
    """Fields with one drawn white cell each (the README's `--fields`): each field's one cell is found and
    used; a field with two white cells is skipped and named, not guessed at."""
    from cytoedge.runtime.cells import write_image_with_scale
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    data = tmp_path / "fields"
    for c, cls in enumerate(("lymphocyte", "neutrophil")):
        (data / cls).mkdir(parents=True)
        for k in range(6):  # one more than adapt needs: a drawn cell can be found as two
            smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=1, classes=(cls,), ddim_steps=5, seed=10 * c + k))
            write_image_with_scale(data / cls / f"field{k}.png", smear.rgb, smear.um_per_px)
    two = generate_smear(bundle, ort_backend, SmearSpec(n_white=2, classes=("neutrophil",), ddim_steps=5, seed=99))
    write_image_with_scale(data / "neutrophil" / "two-cells.png", two.rgb, two.um_per_px)
    out = tmp_path / "adapted"
    run = cytoedge("adapt", "--data", data, "--fields", "--model", bundle.path, "--out", out, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 0, run.stderr
    assert "two-cells.png: 2 white cells found; a labelled field needs one" in run.stdout
    a = ModelBundle.load(out).manifest["adaptation"]
    assert a["input"] == "fields" and sum(a["cells"].values()) == 13 - a["skipped_fields"]
    assert min(a["cells"].values()) >= 5 and set(a["cells"]) == {"lymphocyte", "neutrophil"}
    assert f"{13 - a['skipped_fields']} cells of 2 classes" in run.stdout


# --- review exports as labelled data (the lab loop: corrections feed calibrate and adapt) ------------------------------
REVIEW_CLASSES = ("lymphocyte", "monocyte", "neutrophil")  # drawn cells the detector finds one for one


@pytest.fixture(scope="module")
def reviewed_smear(tmp_path_factory, bundle, ort_backend) -> tuple[Path, Path]:
    """A scored smear of drawn cells and a review export in which a reader confirmed each found cell as
    the class it was drawn as (or reclassified it to that class): (export path, results path)."""
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, write_smear_files

    classes = tuple(c for c in REVIEW_CLASSES for _ in range(8))
    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=len(classes), classes=classes, ddim_steps=20,
                                                          seed=4))
    root = tmp_path_factory.mktemp("reviewed")
    png = write_smear_files(smear, root / "slide")[0]
    run = cytoedge("score", png, "--out", root / "out", "--um-per-px", smear.um_per_px, "--no-heatmaps",
                   "--threads", "1", "--quiet", "--no-run-log")
    assert run.returncode == 0, run.stderr
    document = json.loads((root / "out" / "results.json").read_text())
    entry = document["slides"][0]
    cells = []
    for c in entry["cells"]:
        drawn = next((t["class"] for t in smear.truth if t["bbox"][0] <= c["centre"][0] <= t["bbox"][2]
                      and t["bbox"][1] <= c["centre"][1] <= t["bbox"][3]), None)
        status = "unreviewed" if drawn is None else "confirmed" if drawn == c["class"] else "reclassified"
        cells.append({"id": c["id"], "predicted": c["class"], "label": drawn, "status": status,
                      "centre": c["centre"], "field": c["field"]})
    export = {"format": "cytoedge-review", "format_version": 1, "source": entry["source"],
              "source_sha256": entry["source_sha256"], "um_per_px": entry["summary"]["scale"]["um_per_px"],
              "bundle_sha256": document["bundle_sha256"],
              "calibration_sha256": document["estimator_settings"]["calibration_sha256"], "model": document["model"],
              "cytoedge_version": document["cytoedge_version"], "reviewer": "test", "exported": "2026-12-02T00:00:00Z",
              "cells": cells}
    path = root / "review.json"
    path.write_text(json.dumps(export))
    return path, root / "out" / "results.json"


def test_adapt_takes_review_exports_as_labelled_cells(bundle, reviewed_smear, tmp_path):
    export, _ = reviewed_smear
    reviewed = [c for c in json.loads(export.read_text())["cells"] if c["label"]]
    out = tmp_path / "adapted"
    run = cytoedge("adapt", "--reviews", export, "--model", bundle.path, "--out", out, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 0, run.stderr
    a = ModelBundle.load(out).manifest["adaptation"]
    assert a["input"] == "reviews" and a["command"].endswith("--reviews") and str(export) in a["data"]
    assert a["cells"] == {c: sum(r["label"] == c for r in reviewed) for c in REVIEW_CLASSES}


def test_review_exports_of_another_slide_or_too_few_classes_are_refused(bundle, reviewed_smear, tmp_path):
    export, _ = reviewed_smear
    doc = json.loads(export.read_text())
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**doc, "source_sha256": "0" * 64}))
    run = cytoedge("adapt", "--reviews", changed, "--model", bundle.path, "--out", tmp_path / "a", "--threads", "1")
    no_traceback(run)
    assert run.returncode == 2 and f"{changed}: " in run.stderr and "not the slide that was reviewed" in run.stderr
    work = tmp_path / "bundle"
    shutil.copytree(bundle.path, work)
    run = cytoedge("calibrate", "--reviews", export, "--model", work, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 2 and "calibration needs every class" in run.stderr
    assert folder_digest(work) == folder_digest(bundle.path)  # nothing was written
