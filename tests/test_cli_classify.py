"""`cytoedge classify` end to end on generated crop files."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from cytoedge.runtime.cli import main

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schemas" / "result-document.schema.json").read_text())


def test_classify_json_on_generated_crops(crop_files, capsys, bundle):
    rc = main(["classify", *map(str, crop_files[:4]), "--json", "--threads", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["errors"] == []
    assert doc["bundle_sha256"] == bundle.sha256 and doc["estimator"] == "fast"
    from cytoedge.runtime import __version__
    from cytoedge.runtime.result_document import estimator_settings

    assert (doc["format"], doc["format_version"], doc["cytoedge_version"]) == ("cytoedge-classify", 1, __version__)
    assert doc["estimator_settings"]["calibration_sha256"] == estimator_settings(bundle, "fast")["calibration_sha256"]
    assert [r["image"] for r in doc["results"]] == list(map(str, crop_files[:4]))
    for r in doc["results"]:
        assert r["class"] in bundle.class_names and r["nfe"] >= len(bundle.class_names)
        assert r["runner_up"] in bundle.class_names and r["runner_up"] != r["class"]
        assert r["estimator_detail"]["confidence_label"] in ("confident", "uncertain", "anomalous", "unreliable")
    jsonschema.validate(doc, SCHEMA)  # the one schema of every result document
    doc["results"][0].pop("runner_up")
    with pytest.raises(jsonschema.ValidationError, match="runner_up"):
        jsonschema.validate(doc, SCHEMA)


def test_bad_files_are_named_and_the_others_go_on(crop_files, tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(crop_files[0].read_bytes()[:60])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    rc = main(["classify", str(crop_files[1]), str(broken), str(text), str(tmp_path / "missing.png"),
               "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 1
    assert str(crop_files[1]) in captured.out
    for bad in (broken, text, tmp_path / "missing.png"):
        assert str(bad) in captured.err
    assert captured.err.count("cytoedge classify:") == 3


def test_a_crop_too_small_for_the_model_fails_alone(crop_files, tmp_path, capsys):
    """One crop smaller than the model's field of view at its declared scale is named with the reason;
    its neighbours are scored."""
    from cytoedge.runtime.cells import declared_um_per_px, read_rgb, write_image_with_scale

    tiny = tmp_path / "tiny.png"
    write_image_with_scale(tiny, read_rgb(crop_files[0])[:20, :20], declared_um_per_px(crop_files[0]))
    rc = main(["classify", str(crop_files[0]), str(tiny), str(crop_files[1]), "--json", "--threads", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert [r["image"] for r in doc["results"]] == [str(crop_files[0]), str(crop_files[1])]
    assert len(doc["errors"]) == 1 and doc["errors"][0]["image"] == str(tiny)
    assert doc["errors"][0]["error"].startswith(f"{tiny}: 20×20 px") and "--um-per-px" in doc["errors"][0]["error"]


def test_reference_estimator_from_the_cli(crop_files, capsys):
    rc = main(["classify", str(crop_files[0]), "--estimator", "reference", "--json", "--threads", "1"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["results"][0]["estimator"] == "reference"
    assert doc["results"][0]["nfe"] >= 20 * 1
    # the reference protocol has no calibrated anomaly score: "not assessed", not "not anomalous"
    assert doc["results"][0]["flags"]["anomalous"] is None and doc["results"][0]["anomaly_score"] is None
    jsonschema.validate(doc, SCHEMA)


def test_folder_input_and_unknown_backend(crop_files, capsys):
    rc = main(["classify", str(crop_files[0].parent), "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and len(out.strip().splitlines()) == len(crop_files)
    assert main(["classify", str(crop_files[0]), "--backend", "tpu"]) == 2
    assert "unknown backend 'tpu'" in capsys.readouterr().err


def test_evaluate_reports_metrics_on_a_generated_labelled_folder(crop_files, tmp_path, bundle, capsys):
    import shutil

    for path in crop_files:
        cls = path.stem.split("_", 1)[1]
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "data" / cls / path.name)
    out = tmp_path / "metrics.json"
    rc = main(["evaluate", "--data", str(tmp_path / "data"), "--half", "all", "--threads", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    capsys.readouterr()
    assert rc == 0 and report["cells"] == len(crop_files)
    counts = report["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == len(crop_files)
    assert report["accuracy"] == sum(counts[i][i] for i in range(len(counts))) / len(crop_files)
    assert 0 <= report["conformal_coverage"] <= 1 and report["nfe_mean"] >= len(bundle.class_names)
    assert report["stain_normalisation"] is None
    rc = main(["evaluate", "--data", str(tmp_path / "data"), "--half", "all", "--threads", "1", "--out", str(out),
               "--stain-normalise"])
    capsys.readouterr()
    assert rc == 0 and json.loads(out.read_text())["stain_normalisation"] == "reinhard-per-crop"


def test_stain_normalisation_is_applied_on_request_and_recorded(crop_files, capsys):
    """With --stain-normalise each crop's colours are matched to the reference before scoring (the
    probabilities move), and the JSON document says which normalisation was applied."""
    rc = main(["classify", *map(str, crop_files[:3]), "--json", "--threads", "1"])
    plain = json.loads(capsys.readouterr().out)
    rc_norm = main(["classify", *map(str, crop_files[:3]), "--json", "--threads", "1", "--stain-normalise"])
    normalised = json.loads(capsys.readouterr().out)
    assert rc == rc_norm == 0
    assert plain["stain_normalisation"] is None and normalised["stain_normalisation"] == "reinhard-per-crop"
    assert [r["probabilities"] for r in plain["results"]] != [r["probabilities"] for r in normalised["results"]]
