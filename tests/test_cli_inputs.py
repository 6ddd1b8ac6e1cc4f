"""Inputs at the edge, as a user meets them: `cytoedge` run as a subprocess on bad scales, zero-sized
DICOM, unreadable fields in a folder, images far larger than a crop or a field. Each is refused with
a message naming the input and the limit, never a traceback, and the good inputs of the same run
keep their results."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from cytoedge.runtime.limits import MAX_CROP_SIDE_PX, MAX_FIELD_PIXELS
from cytoedge.runtime.synthetic_smear import SmearSpec, frames_of, generate_smear, write_wsi_dicom

BAD_SCALES = ["nan", "inf", "50", "1000", "0", "-1"]
FAST = ["--threads", "1", "--no-heatmaps", "--quiet"]


def cytoedge(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cytoedge.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` × ``height`` but holds almost no pixel data: a reader that
    checks the header refuses it at once, one that decodes first would try to allocate it."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def write_unreadable(folder: Path) -> list[Path]:
    """Three files with image names that no reader can decode: truncated, text, empty."""
    folder.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))
    truncated, text, empty = folder / "truncated.png", folder / "notes.jpg", folder / "empty.tif"
    truncated.write_bytes(encoded.tobytes()[:40])
    text.write_text("not an image")
    empty.write_bytes(b"")
    return [truncated, text, empty]


@pytest.fixture(scope="module")
def smear(bundle, ort_backend):
    """A small field with four white cells drawn by the bundled model (a few DDIM steps)."""
    return generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))


@pytest.fixture(scope="module")
def smear_png(smear, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("field") / "smear.png"
    cv2.imwrite(str(path), smear.rgb[..., ::-1])
    return path


def test_the_shared_scoring_options_reach_demo(tmp_path):
    """score, demo and serve take one set of scoring flags (an option added to one reaches all)."""
    run = cytoedge("demo", "-n", "2", "--steps", "3", "--out", tmp_path, "--stain-context", "cell", *FAST)
    assert run.returncode in (0, 1) and "Traceback" not in run.stderr  # 1: two drawn cells may not be found
    options = json.loads((tmp_path / "results.json").read_text())["run"]["options"]
    assert options["stain_context"] == "cell" and options["heatmaps"] is False


@pytest.mark.parametrize("value", BAD_SCALES)
@pytest.mark.parametrize("command", [["score", "slide.png", "--out", "out"], ["classify", "cell.png"]])
def test_a_bad_um_per_px_is_refused_by_the_parser(command, value):
    run = cytoedge(*command, f"--um-per-px={value}", timeout=60)
    assert run.returncode == 2
    assert "--um-per-px" in run.stderr and "0.02-2.0" in run.stderr and repr(value) in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("command", [["submit", "slide.png"], ["demo"], ["evaluate", "--data", "d"],
                                     ["calibrate", "--data", "d"], ["synth", "--out", "o"], ["export", "--out", "o"]])
def test_every_command_with_um_per_px_checks_it(command):
    run = cytoedge(*command, "--um-per-px", "nan", timeout=60)
    assert run.returncode == 2 and "--um-per-px" in run.stderr and "0.02-2.0" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_zero_rows_dicom_fails_alone(tmp_path, smear, smear_png):
    """A DICOM whose frames have 0 rows, and one whose pixel spacing is 1 mm, are error entries naming the
    file and what is wrong; the good field beside them keeps its results."""
    glass = list(frames_of(np.full((128, 128, 3), 230, np.uint8), 64))
    path = write_wsi_dicom(tmp_path / "wsi.dcm", glass, (128, 128), 64, smear.um_per_px, organisation="TILED_FULL")
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(tmp_path / "zero.dcm")
    coarse = write_wsi_dicom(tmp_path / "coarse.dcm", glass, (128, 128), 64, 1000.0, organisation="TILED_FULL")
    run = cytoedge("score", smear_png, tmp_path / "zero.dcm", coarse, "--out", tmp_path / "out", "--json", *FAST)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    doc = json.loads(run.stdout)
    good, zero, far = doc["slides"]
    assert good["status"] == "ok" and len(good["cells"]) >= 1
    assert zero["status"] == "error" and zero["error"].startswith(str(tmp_path / "zero.dcm"))
    assert "Rows is 0" in zero["error"] and f"cytoedge score: {tmp_path / 'zero.dcm'}" in run.stderr
    assert far["status"] == "error" and far["error"].startswith(f"{coarse}: pixel size (dicom): 1000")
    assert "outside the supported range 0.02-2.0" in far["error"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["slides"][0]["cells"] == good["cells"]
    csv = Path(doc["run"]["outputs"][str(smear_png)]["csv"])
    assert len(csv.read_text().splitlines()) == 1 + len(good["cells"])


def test_unreadable_fields_in_a_folder_are_errors(tmp_path, smear, smear_png):
    """The folder keeps the cells of its good field, but each unreadable field is named and the exit
    code is 1; a folder with nothing readable is an error entry naming its files."""
    mixed = tmp_path / "mixed"
    bad = write_unreadable(mixed)
    (mixed / "good.png").write_bytes(smear_png.read_bytes())
    broken = write_unreadable(tmp_path / "broken")
    run = cytoedge("score", mixed, tmp_path / "broken", "--out", tmp_path / "out", "--json",
                   "--um-per-px", str(smear.um_per_px), *FAST)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    doc = json.loads(run.stdout)
    kept, empty = doc["slides"]
    assert kept["status"] == "ok" and kept["cells"]
    assert sorted(f["source"] for f in kept["summary"]["failures"]) == sorted(map(str, bad))
    assert empty["status"] == "error" and "none of its 3 fields could be read" in empty["error"]
    for path in bad + broken:
        assert f"cytoedge score: {path}:" in run.stderr


def test_an_image_far_larger_than_a_crop_is_refused_by_classify(tmp_path, smear):
    """A 2100 × 2100 field given to classify is named and sent to `score`; the crop beside it is classified."""
    x, y = smear.truth[0]["centre"]
    crop, field = tmp_path / "cell.png", tmp_path / "field.png"
    x0, y0 = int(max(x - 48, 0)), int(max(y - 48, 0))
    cv2.imwrite(str(crop), smear.rgb[y0:y0 + 96, x0:x0 + 96, ::-1])
    cv2.imwrite(str(field), cv2.resize(smear.rgb, (2100, 2100))[..., ::-1])
    run = cytoedge("classify", crop, field, "--json", "--threads", "1")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    doc = json.loads(run.stdout)
    assert [r["image"] for r in doc["results"]] == [str(crop)]
    (error,) = doc["errors"]
    assert error["image"] == str(field)
    assert "2100×2100 px" in error["error"] and f"{MAX_CROP_SIDE_PX} px" in error["error"]
    assert "not a single-cell crop" in error["error"] and "cytoedge score" in error["error"]


def test_a_field_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    """13000² and 20000² declared in the header, nearly no pixel data: refused without decoding."""
    sizes = (13000, 20000)
    paths = [png_header_only(tmp_path / f"huge{side}.png", side, side) for side in sizes]
    run = cytoedge("score", *paths, "--out", tmp_path / "out", "--um-per-px", "0.2", "--json", *FAST)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    errors = [s["error"] for s in json.loads(run.stdout)["slides"]]
    assert errors[0].startswith(f"{paths[0]}: 13000×13000 px (169,000,000 pixels)")
    assert errors[1].startswith(f"{paths[1]}: more than")
    for error in errors:
        assert f"{MAX_FIELD_PIXELS:,}-pixel limit" in error and "DICOM VL Whole Slide Microscopy" in error
    run = cytoedge("classify", paths[0], "--threads", "1")
    assert run.returncode == 1 and "DICOM VL Whole Slide Microscopy" in run.stderr


def test_an_internal_error_on_one_slide_spares_the_others(tmp_path, smear, smear_png, monkeypatch, capsys, caplog):
    """Not a CytoedgeError (a bug): that slide's entry says so, the traceback goes to the log, and the
    slides after it are still scored."""
    import cytoedge.runtime.sources as sources
    from cytoedge.runtime.cli import main

    real = sources.open_source
    boom = tmp_path / "boom.png"
    boom.write_bytes(smear_png.read_bytes())

    def open_source(path, um_per_px=None):
        if Path(path) == boom:
            raise KeyError("frame 7")
        return real(path, um_per_px)

    monkeypatch.setattr(sources, "open_source", open_source)
    rc = main(["score", str(boom), str(smear_png), "--out", str(tmp_path / "out"), "--json",
               "--um-per-px", str(smear.um_per_px), *FAST])
    captured = capsys.readouterr()
    failed, scored = json.loads(captured.out)["slides"]
    assert rc == 1
    assert failed["error"] == f"{boom}: internal error while scoring: KeyError: 'frame 7'"
    assert scored["status"] == "ok" and scored["cells"]
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is KeyError]
    assert logged and str(boom) in logged[0].getMessage()


def test_heatmaps_for_all_cells_up_to_the_limit(smear_png, tmp_path):
    """`--heatmaps-for all --max-heatmaps 2`: the first two cells get a map, flagged or not, and no more."""
    run = cytoedge("score", smear_png, "--out", tmp_path, "--um-per-px", "0.2", "--heatmaps-for", "all",
                   "--max-heatmaps", "2", "--threads", "1", "--quiet", "--no-run-log")
    assert run.returncode == 0, run.stderr
    cells = json.loads((tmp_path / "results.json").read_text())["slides"][0]["cells"]
    assert [c["id"] for c in cells if "heatmap" in c] == [c["id"] for c in cells][:2]
    assert all(0.0 <= c["heatmap"]["inside_cell_fraction"] <= 1.0 for c in cells if "heatmap" in c)
