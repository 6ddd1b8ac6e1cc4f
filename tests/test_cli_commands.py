"""Every `cytoedge` command not covered elsewhere, run as a user runs it: a real subprocess with the
options README.md shows, on cells the bundled model draws itself. synth, evaluate, calibrate (on a copy
of the bundle), watch (against a real `cytoedge serve`), export, build-engine (TensorRT is absent here:
the refusal is the behaviour), quantize (on a copy, kept small as tests/test_int8.py does), doctor,
bench, and `--help` of every command in COMMANDS. The repository's bundle is never written to."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cli import COMMANDS
from cytoedge.runtime.labelled_data import in_fit_half
from test_cli_serve import wait_for_serve

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]
CONV = "/up.4.0/conv2/Conv"  # one convolution made INT8: keeps `cytoedge quantize` to one trial


def cytoedge(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def command_name(module: str) -> str:
    return module.rsplit(".", 1)[1].replace("_", "-")


def no_traceback(run: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in run.stderr, run.stderr
    assert "Traceback" not in run.stdout, run.stdout


@pytest.fixture(scope="module")
def repo_bundle_digest(bundle) -> dict[str, str]:
    return folder_digest(bundle.path)


def names_in_half(cls: str, fit: bool, count: int) -> list[str]:
    """``count`` file names that the fixed split (runtime/labelled_data.py) puts in the fit or held-out half."""
    names = (f"{cls}_{k:03d}.png" for k in range(10_000))
    return [n for n, _ in zip((n for n in names if in_fit_half(Path(n)) == fit), range(count))]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, bundle, ort_backend) -> Path:
    """Four cells per class drawn by the bundled model, as crop files at the bundle's source scale (as
    conftest's crop_files) in a labelled folder DIR/<class>/<image>: two per class in the fit half
    (calibrate's default) and two in the held-out half (evaluate's)."""
    from cytoedge.runtime.cells import write_image_with_scale
    from cytoedge.runtime.sampler import ddim_sample

    per_class = 4
    labels = np.repeat(np.arange(len(bundle.class_names)), per_class)
    images = ddim_sample(bundle, ort_backend, labels, steps=12, seed=11)
    factor = float(bundle.manifest["input"].get("source_px_per_model_px", 1.0))
    root = tmp_path_factory.mktemp("labelled")
    for c, cls in enumerate(bundle.class_names):
        (root / cls).mkdir()
        names = names_in_half(cls, True, per_class // 2) + names_in_half(cls, False, per_class // 2)
        for name, im in zip(names, images[labels == c]):
            big = cv2.resize(im, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
            write_image_with_scale(root / cls / name, big, bundle.um_per_px / factor)
    return root


@pytest.fixture(scope="module")
def train_and_check(tmp_path_factory, labelled) -> tuple[Path, Path]:
    """Two disjoint labelled folders, one cell per class each (quantize's TRAIN_DIR and CHECK_DIR)."""
    base = tmp_path_factory.mktemp("quantize-data")
    train, check = base / "train", base / "check"
    for folder in sorted(labelled.iterdir()):
        first, second = sorted(folder.iterdir())[:2]
        for dst, src in ((train, first), (check, second)):
            (dst / folder.name).mkdir(parents=True)
            shutil.copy(src, dst / folder.name / src.name)
    return train, check


@pytest.fixture
def bundle_copy(bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    return copy


# --- --help ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", COMMANDS, ids=command_name)
def test_help_of_every_command(module):
    name = command_name(module)
    run = cytoedge(name, "--help", timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"usage: cytoedge {name}") and "--help" in run.stdout
    no_traceback(run)


# --- synth -------------------------------------------------------------------------------------------------------

def test_synth_writes_the_asked_cells_at_the_models_size_and_scale(bundle, tmp_path):
    out = tmp_path / "cells"
    run = cytoedge("synth", "--class", "ig", "-n", "2", "--out", out, "--steps", "3", "--threads", "1")
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    assert run.stdout.strip() == f"2 cells in {out}"
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["0000_ig.png", "0001_ig.png"]
    index = json.loads((out / "cells.json").read_text())
    assert [c["file"] for c in index["cells"]] == [p.name for p in pngs]
    assert [c["class"] for c in index["cells"]] == ["ig", "ig"]
    assert index["um_per_px"] == bundle.um_per_px and index["steps"] == 3
    assert index["bundle_sha256"] == bundle.sha256 and index["model"] == bundle.name
    assert index["guidance"] == bundle.manifest["sampling"]["guidance_scale"]  # the manifest's scale by default
    images = [cv2.imread(str(p)) for p in pngs]
    for im in images:
        assert im is not None and im.shape == (bundle.input_size, bundle.input_size, 3) and im.dtype == np.uint8
        assert im.std() > 5  # a drawn cell, not a flat tile
    assert not np.array_equal(images[0], images[1])  # two draws, not one cell twice


def test_synth_refuses_an_unknown_class_by_name(tmp_path):
    out = tmp_path / "cells"
    run = cytoedge("synth", "--class", "dragon", "-n", "2", "--out", out, "--steps", "3", "--threads", "1")
    assert run.returncode == 2
    no_traceback(run)
    assert "cytoedge synth:" in run.stderr and "unknown class" in run.stderr and "dragon" in run.stderr
    assert not out.exists() or not list(out.glob("*.png"))  # nothing drawn for a refused run


# --- evaluate ----------------------------------------------------------------------------------------------------

def test_evaluate_reports_balanced_accuracy_on_the_held_out_half(bundle, labelled, tmp_path):
    files = sorted(labelled.rglob("*.png"))
    held_out = [f for f in files if not in_fit_half(f)]
    assert held_out, "the fixture's names should put some cells in the held-out half"
    out = tmp_path / "metrics.json"
    run = cytoedge("evaluate", "--data", labelled, "--threads", "1", "--out", out)
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    report, printed = json.loads(out.read_text()), json.loads(run.stdout)
    assert report["half"] == "held-out" and report["cells"] == printed["cells"] == len(held_out)
    assert report["data"] == str(labelled) and report["bundle_sha256"] == bundle.sha256
    assert report["estimator"] == "fast" and report["backend"] == "onnxruntime-cpu"
    counts = np.array(report["confusion_matrix"]["counts"])
    assert counts.sum() == len(held_out)
    rows = counts.sum(1)
    expected = float(np.mean([counts[i, i] / rows[i] for i in range(len(rows)) if rows[i]]))
    assert printed["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"])
    assert report["balanced_accuracy"] == pytest.approx(expected)
    assert report["balanced_accuracy"] >= 0.5  # the model's own drawings: it should mostly know them
    assert report["nfe_mean"] >= len(bundle.class_names) and 0 <= report["ece_15"] <= 1


# --- calibrate ---------------------------------------------------------------------------------------------------

def test_calibrate_rewrites_a_copy_of_the_bundle_and_leaves_the_repos_alone(bundle, labelled, bundle_copy,
                                                                            repo_bundle_digest):
    before = (bundle_copy / "calibration.json").read_bytes()
    fit = [f for f in sorted(labelled.rglob("*.png")) if in_fit_half(f)]
    run = cytoedge("calibrate", "--data", labelled, "--model", bundle_copy, "--threads", "1")
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    assert run.stdout.startswith(f"calibrated {bundle.name} on {len(fit)} cells of {labelled} (fit half)")
    assert run.stdout.rstrip().endswith(f"-> {bundle_copy / 'calibration.json'}")
    assert (bundle_copy / "calibration.json").read_bytes() != before
    recalibrated = ModelBundle.load(bundle_copy)  # schema and every hash still check out
    provenance = recalibrated.calibration.provenance
    assert provenance["command"] == "cytoedge calibrate" and provenance["data"] == str(labelled)
    assert provenance["half"] == "fit" and provenance["cells"] == len(fit)
    assert provenance["model_sha256_before"] == bundle.sha256 and recalibrated.sha256 != bundle.sha256
    assert recalibrated.calibration.probes and recalibrated.calibration.temperature > 0
    crop = sorted(labelled.rglob("*.png"))[0]
    classified = cytoedge("classify", crop, "--model", bundle_copy, "--json", "--threads", "1")
    assert classified.returncode == 0, classified.stderr
    doc = json.loads(classified.stdout)
    assert doc["bundle_sha256"] == recalibrated.sha256 and doc["results"][0]["class"] in bundle.class_names
    assert folder_digest(bundle.path) == repo_bundle_digest


def test_calibrate_on_one_cell_per_class_is_refused_cleanly(bundle, labelled, bundle_copy, tmp_path):
    """Every class present, but one cell each in the fit half: too few to fit and check the calibration on
    (its fit splits each class in two). That is an input problem, refused in one line with exit code 2
    and the bundle unchanged, not a crash."""
    data = tmp_path / "one-per-class"
    for folder in sorted(labelled.iterdir()):
        (data / folder.name).mkdir(parents=True)
        first = next(f for f in sorted(folder.iterdir()) if in_fit_half(f))
        shutil.copy(first, data / folder.name / first.name)
    before = folder_digest(bundle_copy)
    run = cytoedge("calibrate", "--data", data, "--model", bundle_copy, "--threads", "1")
    no_traceback(run)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("cytoedge calibrate:")]
    assert len(errors) == 1, run.stderr
    assert folder_digest(bundle_copy) == before


# --- serve / submit / watch --------------------------------------------------------------------------------------

@pytest.fixture
def field(bundle, ort_backend, tmp_path) -> tuple[Path, float]:
    """A field with four white cells drawn by the bundled model, under the daemon's root."""
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))
    root = (tmp_path / "root").resolve()
    root.mkdir()
    path = root / "smear.png"
    cv2.imwrite(str(path), smear.rgb[..., ::-1])
    return path, smear.um_per_px


@pytest.fixture
def daemon(field, tmp_path):
    """`cytoedge serve` with the README's options, polled until it answers HELLO."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "serve.stderr"
    with log.open("w+") as stderr:
        proc = subprocess.Popen([*CLI, "serve", "--endpoint", endpoint, "--roots", str(field[0].parent),
                                 "--journal", str(tmp_path / "journal.sqlite3"), "--threads", "1", "--no-heatmaps"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_for_serve(proc, endpoint, log)
            yield proc, endpoint, log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_watch_follows_a_submitted_job_to_its_summary(daemon, field):
    proc, endpoint, log = daemon
    path, um_per_px = field
    submitted = cytoedge("submit", path, "--endpoint", endpoint, "--json", "--timeout", "120",
                         "--um-per-px", um_per_px)
    assert submitted.returncode == 0, submitted.stderr
    doc = json.loads(submitted.stdout)
    job = doc["run"]["jobs"][str(path)]
    cells = doc["slides"][0]["cells"]
    assert cells, "the field should have white cells"

    run = cytoedge("watch", job, "--endpoint", endpoint, "--json-lines", "--timeout", "60", timeout=120)
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(e["job_id"] == job for e in events)
    watched = [e for e in events if e["event"] == "cell"]
    assert [e["seq"] for e in watched] == list(range(1, len(cells) + 1))
    assert [e["record"] for e in watched] == cells  # the same records submit collected, in order
    assert events[-1]["event"] == "summary" and events[-1]["cells"] == len(cells)
    assert [e["event"] for e in events].count("summary") == 1

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "Traceback" not in log.read_text()


# --- export ------------------------------------------------------------------------------------------------------

EXPORTED = ["denoiser.onnx", "denoiser_error.onnx", "denoiser_fp16.onnx", "denoiser_error_fp16.onnx",
            "manifest.json", "calibration.json"]


def test_export_writes_a_loadable_onnx_bundle_that_matches_the_source(bundle, ort_backend, tmp_path,
                                                                       repo_bundle_digest):
    import onnxruntime as ort

    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    out = tmp_path / "exported"
    run = cytoedge("export", "--out", out)
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    report = json.loads(run.stdout)
    assert report["opset"] >= 17
    assert report["denoiser_max_abs_error_vs_torch"] < 1e-4
    assert report["denoiser_error_max_rel_error_vs_torch"] < 1e-4
    assert report["denoiser_fp16_max_abs_error_vs_fp32"] < 0.05
    assert {"Softmax", "ReduceMean"} <= set(report["fp16"]["fp32_op_types"])  # kept FP32 in the FP16 copies
    assert set(EXPORTED) <= {p.name for p in out.iterdir()}

    exported = ModelBundle.load(out)
    assert {"denoiser", "denoiser_error", "denoiser_fp16", "denoiser_error_fp16"} <= set(exported.manifest["networks"])
    assert exported.class_names == bundle.class_names and exported.input_size == bundle.input_size

    rng = np.random.default_rng(0)
    b, s = 3, bundle.input_size
    x = rng.standard_normal((b, 3, s, s)).astype(np.float32)
    t, c = np.array([10, 400, 900]), np.array([0, 3, len(bundle.class_names)])  # last: the null class
    source_eps = ort_backend.predict_noise(x, t, c)
    eps = OnnxRuntimeBackend(exported, threads=1).predict_noise(x, t, c)
    assert eps.shape == x.shape and np.abs(eps - source_eps).max() < 1e-4
    fp16 = OnnxRuntimeBackend(exported, threads=1, model_path=exported.network_path("denoiser_fp16"))
    eps16 = fp16.predict_noise(x, t, c)
    assert np.abs(eps16 - source_eps).max() < 0.05

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    noise = rng.standard_normal(x.shape).astype(np.float32)
    feeds = {"x0": x, "noise": noise, "timestep": t.astype(np.int64), "class_id": c.astype(np.int64),
             "weight": np.ones(b, np.float32)}
    errors = {}
    for name in ("denoiser_error", "denoiser_error_fp16"):
        session = ort.InferenceSession(str(exported.network_path(name)), options, providers=["CPUExecutionProvider"])
        (errors[name],) = session.run(None, feeds)  # dynamic batch: 3 here
        assert errors[name].shape == (b,) and np.isfinite(errors[name]).all() and (errors[name] >= 0).all()
    np.testing.assert_allclose(errors["denoiser_error_fp16"], errors["denoiser_error"], rtol=0.02)
    assert folder_digest(bundle.path) == repo_bundle_digest


# --- build-engine ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_engine_without_tensorrt_fails_cleanly_in_one_line():
    run = cytoedge("build-engine", timeout=60)
    assert run.returncode != 0
    no_traceback(run)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "tensorrt" in lines[0].lower() and "not installed" in lines[0]


# --- quantize ----------------------------------------------------------------------------------------------------

def test_quantize_adds_a_checked_int8_graph_to_a_copy(bundle, train_and_check, bundle_copy, repo_bundle_digest):
    """`quantize --data TRAIN_DIR --check CHECK_DIR`, small as tests/test_int8.py keeps it: one candidate
    convolution, one cell per class (the activation-range pass is fixed in size and dominates)."""
    import onnx

    train, check = train_and_check
    old_int8 = (bundle_copy / "denoiser_int8.onnx").read_bytes()
    run = cytoedge("quantize", "--model", bundle_copy, "--data", train, "--per-class", "1", "--check", check,
                   "--check-per-class", "0", "--convs", CONV, "--max-score-shift", "1e9", "--threads", "1", timeout=300)
    no_traceback(run)
    quantized = ModelBundle.load(bundle_copy)
    net = quantized.manifest["networks"]["denoiser_int8"]
    q, verdict = net["quantization"], net["decision_check"]
    assert run.returncode == (0 if verdict["passed"] else 1), run.stderr
    summary = [line for line in run.stdout.splitlines() if line.startswith("INT8 ")]
    assert len(summary) == 1 and str(bundle_copy / "denoiser_int8.onnx") in summary[0]
    assert ("passed" if verdict["passed"] else "FAILED") in summary[0]
    assert q["data"] == str(train) and q["per_class"] == 1 and sorted(q["score_shift_per_conv"]) == [CONV]
    assert CONV not in q["fp32_convs"] and len(q["fp32_convs"]) == q["convs"] - 1
    assert verdict["data"] == str(check) and verdict["cells"] == len(bundle.class_names)
    assert verdict["calibration_sha256"] == quantized.manifest["files"]["calibration.json"]["sha256"]
    assert (bundle_copy / "denoiser_int8.onnx").read_bytes() != old_int8
    graph = onnx.load(str(quantized.network_path("denoiser_int8"))).graph
    producers = {o: n for n in graph.node for o in n.output}
    int8 = [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in producers
            and producers[n.input[0]].op_type == "DequantizeLinear"]
    assert int8 == [CONV]

    doctor = cytoedge("doctor", "--model", bundle_copy, "--json", timeout=60)
    row = next(r for r in json.loads(doctor.stdout)["backends"] if r["name"] == "onnxruntime-cpu-int8")
    assert row["available"] == verdict["passed"] and str(check) in row["reason"]
    assert folder_digest(bundle.path) == repo_bundle_digest


def test_quantize_refuses_a_missing_data_folder_by_name(train_and_check, bundle_copy, tmp_path):
    before = folder_digest(bundle_copy)
    missing = tmp_path / "no-such-train"
    run = cytoedge("quantize", "--model", bundle_copy, "--data", missing, "--check", train_and_check[1], timeout=120)
    assert run.returncode == 2
    no_traceback(run)
    assert f"cytoedge quantize: labelled data folder {missing} does not exist" in run.stderr
    assert folder_digest(bundle_copy) == before


def test_quantize_refuses_a_missing_check_folder_before_touching_the_bundle(train_and_check, bundle_copy, tmp_path):
    """A CHECK_DIR that does not exist is an input error like a missing TRAIN_DIR: refused by name, and the
    bundle is left as it was (not with a rewritten denoiser_int8.onnx its manifest no longer matches)."""
    before = folder_digest(bundle_copy)
    missing = tmp_path / "no-such-check"
    start = time.monotonic()
    run = cytoedge("quantize", "--model", bundle_copy, "--data", train_and_check[0], "--per-class", "1",
                   "--check", missing, "--convs", CONV, "--threads", "1", timeout=300)
    elapsed = time.monotonic() - start
    assert run.returncode == 2
    no_traceback(run)
    assert f"labelled data folder {missing} does not exist" in run.stderr
    assert folder_digest(bundle_copy) == before, "the bundle was modified by a refused run"
    ModelBundle.load(bundle_copy)
    assert elapsed < 30, f"the missing folder was only noticed after {elapsed:.0f} s of work"


# --- doctor ------------------------------------------------------------------------------------------------------

def test_doctor_lists_the_backends_and_why_gpu_ones_are_unavailable(bundle):
    import onnxruntime

    run = cytoedge("doctor", timeout=60)
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    lines = run.stdout.splitlines()
    assert lines[0].endswith(f"bundle: {bundle.name} ({bundle.path})")
    rows = {line.split()[1]: line for line in lines[1:] if line.startswith("  ")}
    assert {"tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "onnxruntime-cpu-int8", "torch"} <= set(rows)
    assert rows["onnxruntime-cpu"].split()[0] == "yes"
    for name, line in rows.items():
        words = line.split()
        assert words[0] in ("yes", "no") and len(words) > 2, f"{name}: no reason given: {line!r}"
    if importlib.util.find_spec("tensorrt") is None:
        assert rows["tensorrt"].split()[0] == "no" and "tensorrt is not installed" in rows["tensorrt"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert rows["onnxruntime-cuda"].split()[0] == "no" and "CUDAExecutionProvider" in rows["onnxruntime-cuda"]
    auto = lines[-1] if not lines[-1].startswith("PROBLEM") else lines[-2]
    assert auto.startswith("auto selects: ") and rows[auto.split()[-1]].split()[0] == "yes"


# --- bench -------------------------------------------------------------------------------------------------------

def test_bench_writes_latency_and_throughput(bundle, tmp_path):
    out = tmp_path / "bench.json"
    run = cytoedge("bench", "--backends", "onnxruntime-cpu", "--batches", "1", "--repeats", "3", "--warmup", "1",
                   "--cells", "2", "--threads", "1", "--out", out, timeout=120)
    assert run.returncode == 0, run.stderr
    no_traceback(run)
    doc = json.loads(out.read_text())
    assert doc["bundle_sha256"] == bundle.sha256 and doc["machine"]["cpu_count"] >= 1
    (row,) = doc["denoiser"]
    assert row["backend"] == "onnxruntime-cpu" and row["batch"] == 1 and row["repeats"] == 3
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["samples_per_s"] == pytest.approx(1000 * row["batch"] / row["p50_ms"], rel=1e-6)
    (estimator,) = doc["estimator_runs"]
    assert estimator["cells"] == 2 and estimator["cells_per_s"] > 0
    table = [line.split() for line in run.stdout.splitlines()]
    assert table[0][:3] == ["backend", "streams", "batch"]
    assert table[1][0] == "onnxruntime-cpu" and table[1][2] == "1"
    assert any(line.startswith("estimator (fast) on onnxruntime-cpu:") for line in run.stdout.splitlines())
