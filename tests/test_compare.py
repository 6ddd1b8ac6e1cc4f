"""`cytoedge compare`, the silent-mode pilot, run as a user runs it (a subprocess) on generated data:
crops the bundled model draws, in a labelled folder, classified and compared, against `cytoedge
evaluate` on the same folder (the issue's done-when: the same per-class figures); a small generated
smear scored and compared with made-up reader labels from a CSV and from review exports (κ and the
confusion matrix against a direct computation, thresholds, warnings, a gallery whose source is gone);
bad inputs refused with exit 2 and the file named. Then the metrics and the review-export loader alone."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.stats import beta

from cytoedge.calibration import metrics as m
from cytoedge.calibration.agreement import Thresholds, agreement, slide_differentials, threshold_failures
from cytoedge.runtime.review_export import ReviewExportError, validate

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]
FAST = ["--threads", "1", "--no-heatmaps", "--quiet"]


def cytoedge(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    run = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert "Traceback" not in run.stderr, run.stderr
    return run


# --- fixtures: a labelled folder of crops, classified; a small smear, scored --------------------------------------

@pytest.fixture(scope="module", params=["declared", "estimated"])
def crops(request, tmp_path_factory, crop_files) -> Path:
    """A work folder holding data/<class>/<crop> (conftest's drawn crops, two per class) and
    results.json, `cytoedge classify data --json` run there (so its image paths are relative). The
    crops declare their pixel size (PNG pHYs), or do not, and classify and evaluate estimate it."""
    from cytoedge.runtime.cells import declared_um_per_px

    base = tmp_path_factory.mktemp("pilot-crops")
    for path in crop_files:
        cls = path.stem.split("_", 1)[1]
        (base / "data" / cls).mkdir(parents=True, exist_ok=True)
        if request.param == "declared":
            shutil.copy(path, base / "data" / cls / path.name)
        else:  # re-encoded by OpenCV, which writes no pHYs
            cv2.imwrite(str(base / "data" / cls / path.name), cv2.imread(str(path)))
            assert declared_um_per_px(base / "data" / cls / path.name) is None
    run = cytoedge("classify", "data", "--json", "--threads", "1", cwd=base)
    assert run.returncode == 0, run.stderr
    (base / "results.json").write_text(run.stdout)
    return base


@pytest.fixture(scope="module")
def smear(tmp_path_factory, bundle, ort_backend) -> Path:
    """A work folder holding smear.png (six drawn white cells) and out/results.json, `cytoedge score
    smear.png` run there (so the slide's source is "smear.png")."""
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    base = tmp_path_factory.mktemp("pilot-smear")
    drawn = generate_smear(bundle, ort_backend, SmearSpec(n_white=6, ddim_steps=5, seed=3))
    cv2.imwrite(str(base / "smear.png"), drawn.rgb[..., ::-1])
    run = cytoedge("score", "smear.png", "--out", "out", *FAST, cwd=base)
    assert run.returncode == 0, run.stderr
    cells = json.loads((base / "out" / "results.json").read_text())["slides"][0]["cells"]
    assert len(cells) >= 4, "the smear should show most of its drawn cells"
    return base


def smear_cells(smear: Path) -> list[dict]:
    return json.loads((smear / "out" / "results.json").read_text())["slides"][0]["cells"]


def other_class(cls: str) -> str:
    return "lymphocyte" if cls != "lymphocyte" else "monocyte"


def reader_labels(cells: list[dict]) -> dict[int, str]:
    """Made-up reader: agrees with the model but on cells 1 and 3."""
    return {c["id"]: other_class(c["class"]) if c["id"] in (1, 3) else c["class"] for c in cells}


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def review_export(smear: Path, labels: dict[int, str | None], **changes) -> dict:
    """The export the review page would write for the smear: ``labels`` by id (None: unreviewed)."""
    doc = json.loads((smear / "out" / "results.json").read_text())
    cells = []
    for c in doc["slides"][0]["cells"]:
        label = labels.get(c["id"])
        status = "unreviewed" if label is None else "confirmed" if label == c["class"] else "reclassified"
        cells.append({"id": c["id"], "predicted": c["class"], "label": label, "status": status})
    differential: dict[str, int] = {}
    for c in cells:
        if c["label"] is not None:
            differential[c["label"]] = differential.get(c["label"], 0) + 1
    return {"format": "cytoedge-review", "format_version": 1, "source": "smear.png",
            "bundle_sha256": doc["bundle_sha256"],
            "calibration_sha256": doc["estimator_settings"].get("calibration_sha256"), "model": doc["model"],
            "cytoedge_version": doc["cytoedge_version"], "results_created": doc["run"]["created"],
            "reviewer": "test reader", "exported": "2026-12-01T10:00:00Z", "cells": cells,
            "differential": differential, **changes}


def direct_kappa(reader: list[str], model: list[str]) -> float:
    r, p = np.array(reader), np.array(model)
    observed = float((r == p).mean())
    chance = sum(float((r == c).mean() * (p == c).mean()) for c in set(reader) | set(model))
    return (observed - chance) / (1 - chance)


# --- the done-when: compare on a labelled folder = evaluate on it ---------------------------------------------------

def test_compare_on_a_labelled_folder_gives_evaluates_per_class_figures(crops, bundle):
    run = cytoedge("compare", "results.json", "--labels", "data", "--out", "cmp", "--json", cwd=crops)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    ev = cytoedge("evaluate", "--data", "data", "--half", "all", "--threads", "1", "--out", "metrics.json", cwd=crops)
    assert ev.returncode == 0, ev.stderr
    evaluated = json.loads((crops / "metrics.json").read_text())
    n = len(list((crops / "data").rglob("*.png")))
    assert report["matching"] == {"matched": n, "results_unlabelled": 0, "labels_unmatched": 0,
                                  "unknown_labels_ignored": {}}
    a = report["agreement"]
    assert a["cells"] == evaluated["cells"] == n
    assert {c: v["sensitivity"] for c, v in a["per_class"].items()} == evaluated["per_class_recall"]
    assert a["confusion_matrix"]["counts"] == evaluated["confusion_matrix"]["counts"]
    assert a["confusion_matrix"]["rows_reader_cols_model"] == evaluated["confusion_matrix"]["rows_true_cols_pred"]
    assert a["balanced_accuracy"] == evaluated["balanced_accuracy"] and a["accuracy"] == evaluated["accuracy"]
    assert report["slides"] == [] and report["bundle_sha256"] == bundle.sha256
    classified = json.loads((crops / "results.json").read_text())
    assert classified["scale"] == evaluated["scale"]  # both read the crops at the same scales
    # the gallery: one inlined image per disagreement, nothing fetched from elsewhere
    page = (crops / "cmp" / "disagreements.html").read_text()
    wrong = n - sum(row[i] for i, row in enumerate(a["confusion_matrix"]["counts"]))
    assert report["gallery"]["disagreements"] == wrong and report["gallery"]["missing_images"] == 0
    assert page.count("<figure>") == wrong and page.count("data:image/png;base64,") == wrong
    assert "http://" not in page and "https://" not in page and "<script" not in page
    sheet = cv2.imread(str(crops / "cmp" / "disagreements.png"))
    assert sheet is not None and sheet.shape[0] > 0
    assert json.loads((crops / "cmp" / "compare.json").read_text())["agreement"] == a


def test_a_csv_of_crop_paths_and_a_capped_gallery(crops):
    """Crops labelled in a CSV by path (absolute here, relative in classify's document: both resolve to
    one file); --max-gallery bounds what the gallery shows."""
    files = sorted((crops / "data").rglob("*.png"))[::2]
    write_csv(crops / "reader.csv", ["image", "label"], [[str(f), f.parent.name] for f in files])
    run = cytoedge("compare", "results.json", "--labels", "reader.csv", "--out", "capped", "--max-gallery", "1",
                   "--json", cwd=crops)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["matching"]["matched"] == len(files) and report["labels"][0]["kind"] == "csv"
    assert report["matching"]["results_unlabelled"] == len(list((crops / "data").rglob("*.png"))) - len(files)
    shown = min(1, report["gallery"]["disagreements"])
    assert report["gallery"]["shown"] == shown
    assert (crops / "capped" / "disagreements.html").read_text().count("<figure>") == shown


# --- a scored smear against a CSV and review exports -----------------------------------------------------------------

def test_csv_labels_on_a_scored_smear(smear):
    cells = smear_cells(smear)
    labels = reader_labels(cells)
    unlabelled = cells[-1]["id"]
    write_csv(smear / "reader.csv", ["source", "id", "label"],
              [["smear.png", cid, "" if cid == unlabelled else cls] for cid, cls in labels.items()])
    run = cytoedge("compare", "out/results.json", "--labels", "reader.csv", "--json", cwd=smear)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    used = [c for c in cells if c["id"] != unlabelled]
    reader, model = [labels[c["id"]] for c in used], [c["class"] for c in used]
    assert report["matching"]["matched"] == len(used) and report["matching"]["results_unlabelled"] == 1
    names = report["agreement"]["confusion_matrix"]["rows_reader_cols_model"]
    expected = np.zeros((len(names), len(names)), int)
    for r, p in zip(reader, model):
        expected[names.index(r), names.index(p)] += 1
    assert report["agreement"]["confusion_matrix"]["counts"] == expected.tolist()
    assert report["agreement"]["kappa"]["value"] == pytest.approx(direct_kappa(reader, model))
    lo, hi = report["agreement"]["kappa"]["ci95"]
    assert lo < report["agreement"]["kappa"]["value"] < hi
    [slide] = report["slides"]
    assert slide["source"] == "smear.png"
    white = [r for r in reader if r != "platelet"]
    for cls, v in slide["classes"].items():
        count = white.count(cls)
        assert v["reader_count"] == count and v["reader_percent"] == pytest.approx(100 * count / len(white))
        assert v["model_percent"] - v["reader_percent"] == pytest.approx(v["difference_pp"])
        lo_cp = beta.ppf(0.025, count, len(white) - count + 1) if count else 0.0
        hi_cp = beta.ppf(0.975, count + 1, len(white) - count) if count < len(white) else 1.0
        assert v["reader_rumke95_percent"] == pytest.approx([100 * lo_cp, 100 * hi_cp])
    # the lab's thresholds
    log = smear / "runlog.sqlite"
    strict = cytoedge("compare", "out/results.json", "--labels", "reader.csv", "--min-kappa", "0.99",
                      "--max-differential-diff", "0", "--min-sensitivity", "lymphocyte=1", "--run-log", log, cwd=smear)
    assert strict.returncode == 1
    assert "threshold not met: kappa" in strict.stderr and "--max-differential-diff 0" in strict.stderr
    assert not log.exists()  # a failed pilot is no revalidation
    lenient = cytoedge("compare", "out/results.json", "--labels", "reader.csv", "--min-kappa", "-1",
                       "--min-sensitivity", "0", "--max-differential-diff", "100", "--run-log", log, cwd=smear)
    assert lenient.returncode == 0, lenient.stderr
    assert "thresholds: all met" in lenient.stdout and "kappa" in lenient.stdout
    # A passed pilot is the monitor's revalidation.
    from cytoedge.runtime.run_log import read_revalidations

    [reval] = read_revalidations(log)
    assert reval["details"]["kappa"] == pytest.approx(report["agreement"]["kappa"]["value"])


def test_review_exports_on_a_scored_smear_and_a_gallery_whose_source_is_gone(smear, tmp_path):
    cells = smear_cells(smear)
    labels = reader_labels(cells)
    labels[cells[0]["id"]] = None  # not reviewed
    (smear / "review.json").write_text(json.dumps(review_export(smear, labels, bundle_sha256="0" * 64)))
    run = cytoedge("compare", "out/results.json", "--labels", "review.json", "--out", "cmp", "--json", cwd=smear)
    assert run.returncode == 0, run.stderr
    assert "WARNING" in run.stderr and "reviewed with model bundle " + "0" * 64 in run.stderr
    report = json.loads(run.stdout)
    assert len(report["warnings"]) == 1 and "0" * 64 in report["warnings"][0]
    used = [c for c in cells if labels[c["id"]] is not None]
    assert report["matching"]["matched"] == len(used) and report["matching"]["results_unlabelled"] == 1
    reader, model = [labels[c["id"]] for c in used], [c["class"] for c in used]
    assert report["agreement"]["kappa"]["value"] == pytest.approx(direct_kappa(reader, model))
    assert report["labels"][0]["kind"] == "review-export" and report["labels"][0]["reviewer"] == "test reader"
    disagreeing = sum(r != p for r, p in zip(reader, model))
    assert report["gallery"]["disagreements"] == disagreeing == 2 and report["gallery"]["missing_images"] == 0
    page = (smear / "cmp" / "disagreements.html").read_text()
    for c in used:
        if labels[c["id"]] != c["class"]:
            assert f"reader {labels[c['id']]} / model {c['class']} (p=" in page
    # the same comparison where the slide is no longer: placeholders that say so, and still exit 0
    shutil.copytree(smear / "out", tmp_path / "out")
    shutil.copy(smear / "review.json", tmp_path / "review.json")
    moved = cytoedge("compare", "out/results.json", "--labels", "review.json", "--out", "cmp", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    page = (tmp_path / "cmp" / "disagreements.html").read_text()
    gone = json.loads((tmp_path / "cmp" / "compare.json").read_text())["gallery"]
    assert gone["missing_images"] == disagreeing and "smear.png: no such file" in page and "not found" in page


def test_two_exports_of_one_slide_and_unknown_labels(smear):
    cells = smear_cells(smear)
    first, second = cells[:2], cells[2:]
    for name, part in (("a.json", first), ("b.json", second)):
        (smear / name).write_text(json.dumps(review_export(smear, {c["id"]: c["class"] for c in part})))
    run = cytoedge("compare", "out/results.json", "--labels", "a.json", "b.json", "--json", cwd=smear)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["matching"]["matched"] == len(cells) and report["agreement"]["kappa"]["value"] == pytest.approx(1)
    write_csv(smear / "smudge.csv", ["source", "id", "label"],
              [["smear.png", c["id"], "smudge" if k == 0 else c["class"]] for k, c in enumerate(cells)])
    refused = cytoedge("compare", "out/results.json", "--labels", "smudge.csv", cwd=smear)
    assert refused.returncode == 2
    assert "smudge.csv:2: label 'smudge' is not a class of the model" in refused.stderr
    assert "--ignore-unknown-labels" in refused.stderr
    kept = cytoedge("compare", "out/results.json", "--labels", "smudge.csv", "--ignore-unknown-labels", "--json",
                    cwd=smear)
    assert kept.returncode == 0, kept.stderr
    report = json.loads(kept.stdout)
    assert report["matching"]["unknown_labels_ignored"] == {"smudge": 1}
    assert report["matching"]["matched"] == len(cells) - 1


BAD_LABELS = {
    "missing": (None, "missing.csv: no such file or folder"),
    "no label column": ("source,id,class\nsmear.png,0,neutrophil\n", "no 'label' column"),
    "no key columns": ("label,cell\nneutrophil,0\n", "needs either 'source' and 'id' columns"),
    "duplicate": ("source,id,label\nsmear.png,0,neutrophil\nsmear.png,0,monocyte\n",
                  "bad.csv:3: cell 0 of smear.png is labelled already in"),
    "bad id": ("source,id,label\nsmear.png,zero,neutrophil\n", "bad.csv:2: id 'zero' is not a whole number"),
    "results as labels": ("results", "review export field 'format' must be 'cytoedge-review'"),
    "bad status": ("status", "review export field 'cells[0].status' must be one of"),
    "not json": ("{not json", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
def test_bad_labels_exit_2_naming_the_file(smear, tmp_path, case):
    content, message = BAD_LABELS[case]
    shutil.copytree(smear / "out", tmp_path / "out")
    if content is None:
        path = tmp_path / "missing.csv"
    elif content == "results":
        path = tmp_path / "bad.json"
        shutil.copy(smear / "out" / "results.json", path)
    elif content == "status":
        doc = review_export(smear, {})
        doc["cells"][0]["status"] = "maybe"
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(doc))
    else:
        path = tmp_path / ("bad.json" if content.startswith("{") else "bad.csv")
        path.write_text(content)
    run = cytoedge("compare", "out/results.json", "--labels", path.name, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.startswith(f"cytoedge compare: {path.name}") and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_bad_results_exit_2_naming_the_file(smear, tmp_path):
    (tmp_path / "review.json").write_text(json.dumps(review_export(smear, {})))
    for results, message in (("absent.json", "absent.json: no such file"),
                             ("review.json", "review.json: is a review export (the reader's labels); give it "
                                             "with --labels")):
        run = cytoedge("compare", results, "--labels", "review.json", cwd=tmp_path)
        assert run.returncode == 2 and message in run.stderr, run.stderr
    no_match = cytoedge("compare", smear / "out" / "results.json", "--labels", "review.json", cwd=tmp_path)
    assert no_match.returncode == 2 and "review.json: no label matches a cell of" in no_match.stderr
    dragon = cytoedge("compare", smear / "out" / "results.json", "--labels", "review.json", "--min-sensitivity",
                      "dragon=0.5", cwd=tmp_path)
    assert dragon.returncode == 2 and "'dragon' is not a class of the model" in dragon.stderr


# --- the metrics alone ---------------------------------------------------------------------------------------------

def test_kappa_on_textbook_tables():
    # Wikipedia's "Cohen's kappa" example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: po 0.7, pe 0.5
    kappa, se = m.cohens_kappa(np.array([[20, 5], [10, 15]]))
    assert kappa == pytest.approx(0.4)
    assert m.cohens_kappa(np.diag([5, 7, 3]))[0] == pytest.approx(1.0)
    assert np.isnan(m.cohens_kappa(np.array([[9, 0], [0, 0]]))[0])  # one class throughout: undefined
    assert np.isnan(m.cohens_kappa(np.zeros((2, 2)))[0])


def test_kappa_standard_error_is_the_delta_method_variance():
    """Fleiss, Cohen & Everitt's large-sample SE is the delta-method SE of κ over the multinomial cell
    proportions: checked against a numerical gradient."""
    def kappa_of(p):
        p = p.reshape(3, 3)
        chance = p.sum(1) @ p.sum(0)
        return (np.trace(p) - chance) / (1 - chance)

    cm = np.array([[30, 4, 2], [6, 20, 3], [1, 5, 25]], float)
    n, p = cm.sum(), cm.ravel() / cm.sum()
    grad = np.array([(kappa_of(p + e) - kappa_of(p - e)) / 2e-7 for e in np.eye(9) * 1e-7])
    delta_se = np.sqrt(grad @ (np.diag(p) - np.outer(p, p)) @ grad / n)
    kappa, se = m.cohens_kappa(cm)
    assert kappa == pytest.approx(kappa_of(p)) and se == pytest.approx(delta_se, rel=1e-5)


def test_rumke_interval_is_the_exact_binomial_interval():
    lo, hi = m.rumke_interval(5, 100)
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (1.6, 11.3)  # Rümke's table, 5 % of 100 cells
    assert m.rumke_interval(0, 100)[0] == 0.0 and m.rumke_interval(100, 100)[1] == 1.0
    assert m.rumke_interval(0, 100)[1] == pytest.approx(1 - 0.025 ** (1 / 100))  # the 0-of-n closed form
    assert all(np.isnan(m.rumke_interval(0, 0)))
    with pytest.raises(ValueError):
        m.rumke_interval(5, 4)


def test_specificity_and_agreement_against_hand_computed_values():
    y = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    # class 0: negatives 4 (y in 1,1,1,2), one called 0 → 3/4; class 1: negatives 3, one called 1 → 2/3
    assert m.per_class_specificity(y, pred, 4)[:3].tolist() == pytest.approx([0.75, 2 / 3, 1.0])
    assert m.per_class_specificity(np.zeros(3, int), np.zeros(3, int), 2)[0] != m.per_class_specificity(
        np.zeros(3, int), np.zeros(3, int), 2)[0]  # NaN: no negatives
    report = agreement(y, pred, ["a", "b", "c", "d"])
    assert report["per_class"]["a"] == {"reader": 2, "model": 2, "agreed": 1, "sensitivity": 0.5,
                                        "specificity": 0.75}
    assert report["per_class"]["d"]["sensitivity"] is None  # the reader never said d
    slides = slide_differentials(["s1", "s1", "s1", "s2", "s2", None], y, pred, ["a", "b", "c", "d"], ["a", "b"])
    assert [s["source"] for s in slides] == ["s1", "s2"]
    s1 = slides[0]["classes"]  # reader a a b, model a b b
    assert s1["a"]["reader_percent"] == pytest.approx(200 / 3) and s1["a"]["difference_pp"] == pytest.approx(-100 / 3)
    failures = threshold_failures(report, slides, Thresholds(min_kappa=0.9, min_sensitivity=((None, 0.6), ("d", 0.1)),
                                                             max_differential_diff_pp=30))
    assert any(f.startswith("kappa") for f in failures)
    assert any("sensitivity of a 0.500" in f for f in failures)
    assert any("sensitivity of d cannot be measured" in f for f in failures)
    assert not any("sensitivity of c" in f for f in failures)  # 1.0 ≥ 0.6
    # s1: a and b 33 pp off; s2 (reader b b, model b a): a and b 50 pp off
    assert sum("--max-differential-diff" in f for f in failures) == 4


# --- the review-export loader alone ----------------------------------------------------------------------------------

def good_export() -> dict:
    return {"format": "cytoedge-review", "format_version": 1, "source": "slide.dcm", "bundle_sha256": "ab" * 32,
            "calibration_sha256": None, "model": "m", "cytoedge_version": "0.1.0", "results_created": None,
            "reviewer": "", "exported": "2026-12-01T10:00:00Z", "future_key": "ignored",
            "cells": [{"id": 12, "predicted": "neutrophil", "label": "monocyte", "status": "reclassified"},
                      {"id": 13, "predicted": "lymphocyte", "label": "lymphocyte", "status": "confirmed"},
                      {"id": 14, "predicted": "eosinophil", "label": None, "status": "unreviewed"}],
            "differential": {"monocyte": 1, "lymphocyte": 1, "neutrophil": 0}}


def test_a_review_export_is_read_and_its_labels_are_the_reviewed_cells():
    export = validate(good_export(), "r.json")
    assert export.labels() == {12: "monocyte", 13: "lymphocyte"} and export.source == "slide.dcm"


@pytest.mark.parametrize("change, field", [
    ({"format": "cytoedge-result"}, "format"),
    ({"format_version": 2}, "format_version"),
    ({"source": ""}, "source"),
    ({"cells": {}}, "cells"),
    ({"differential": {"monocyte": 2, "lymphocyte": 1}}, "differential"),
    ({"cells": [{"id": -1, "predicted": "a", "label": None, "status": "unreviewed"}]}, "cells[0].id"),
    ({"cells": [{"id": 1, "predicted": "a", "label": "b", "status": "confirmed"}]}, "cells[0].label"),
    ({"cells": [{"id": 1, "predicted": "a", "label": None, "status": "reclassified"}]}, "cells[0].label"),
    ({"cells": [{"id": 1, "predicted": "a", "label": "a", "status": "unreviewed"}]}, "cells[0].label"),
    ({"cells": [{"id": 1, "predicted": "a", "status": "unreviewed"}]}, "cells[0].label"),
    ({"cells": [{"id": 1, "predicted": "a", "label": None, "status": "unreviewed"}] * 2}, "cells[1].id"),
])
def test_a_bad_review_export_names_the_file_and_the_field(change, field):
    doc = good_export()
    if "cells" in change and "differential" not in change:
        doc.pop("differential")
    doc.update(change)
    with pytest.raises(ReviewExportError, match="^" + re.escape(f"r.json: review export field '{field}'")):
        validate(doc, "r.json")
