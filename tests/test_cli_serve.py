"""`cytoedge serve` and `cytoedge submit` as a user runs them: real subprocesses, the README's options,
a loopback port. The daemon starts, answers, scores a generated field exactly as `cytoedge score`
does, reports a refused path with its reason while the good one is delivered, and stops cleanly on
SIGTERM; `submit` to a dead endpoint gives up within its connect timeout."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jsonschema
import pytest

from cytoedge.runtime.service.client import ScannerLinkClient, ServiceError
from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schemas" / "result-document.schema.json").read_text())

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]
SCORING = ["--threads", "1", "--no-heatmaps", "--stain-context", "slide"]  # shared scoring options, on both sides
START_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cytoedge(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def without_run(document: dict) -> dict:
    """The document less its run-specific block (options, timings, outputs, created / service, jobs)."""
    return {k: v for k, v in document.items() if k != "run"}


@pytest.fixture(scope="module")
def slides(bundle, ort_backend, tmp_path_factory) -> tuple[Path, float]:
    """A field with four white cells drawn by the bundled model, under the daemon's root."""
    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))
    root = tmp_path_factory.mktemp("root").resolve()
    path = root / "smear.png"
    cv2.imwrite(str(path), smear.rgb[..., ::-1])
    return path, smear.um_per_px


def wait_for_serve(proc: subprocess.Popen, endpoint: str, log: Path) -> None:
    """Poll a starting `cytoedge serve` until it answers HELLO (its log in the message if it dies)."""
    deadline = time.monotonic() + START_S
    while True:
        assert proc.poll() is None, f"serve exited with {proc.returncode}: {log.read_text()}"
        try:
            with ScannerLinkClient(endpoint, timeout_s=1) as client:
                client.hello(timeout_s=1)
            return
        except ServiceError:
            assert time.monotonic() < deadline, f"serve did not answer within {START_S} s"


@pytest.fixture(scope="module")
def daemon(slides, tmp_path_factory):
    """`cytoedge serve` with the README's options, started and polled until it answers HELLO."""
    root = slides[0].parent
    work = tmp_path_factory.mktemp("serve")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    stderr = (work / "serve.stderr").open("w+")
    proc = subprocess.Popen([*CLI, "serve", "--endpoint", endpoint, "--roots", str(root), "--journal",
                             str(work / "j.sqlite3"), "--run-log", str(work / "runlog.sqlite"), *SCORING],
                            stdout=subprocess.DEVNULL, stderr=stderr)
    wait_for_serve(proc, endpoint, work / "serve.stderr")
    try:
        yield proc, endpoint, work / "serve.stderr"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()


def test_submit_json_matches_score_json(daemon, slides, tmp_path):
    from cytoedge.runtime.run_log import read_runs

    _, endpoint, stderr = daemon
    path, um_per_px = slides
    scale = ["--um-per-px", str(um_per_px)]
    submitted = cytoedge("submit", path, "--endpoint", endpoint, "--json", "--timeout", "120", *scale)
    scored = cytoedge("score", path, "--out", tmp_path / "out", "--json", "--quiet", "--run-log",
                      tmp_path / "runlog.sqlite", *SCORING, *scale)
    assert submitted.returncode == 0, submitted.stderr
    assert scored.returncode == 0, scored.stderr
    served, local = json.loads(submitted.stdout), json.loads(scored.stdout)
    jsonschema.validate(served, SCHEMA)  # the one schema of every result document
    jsonschema.validate(local, SCHEMA)
    assert local["slides"][0]["cells"], "the field should have white cells"
    assert served["slides"][0]["cells"] == local["slides"][0]["cells"]  # record for record
    assert without_run(served) == without_run(local)
    # both logged the slide alike, but for when, how long and which command
    [served_row], [local_row] = read_runs(stderr.parent / "runlog.sqlite"), read_runs(tmp_path / "runlog.sqlite")
    assert (served_row["command"], local_row["command"]) == ("serve", "score")
    volatile = ("time", "seconds", "command")
    assert {k: v for k, v in served_row.items() if k not in volatile} == \
           {k: v for k, v in local_row.items() if k not in volatile}
    assert served_row["source_name"] == "smear.png" and served_row["white_cells"] == len(local["slides"][0]["cells"])


def test_one_refused_path_does_not_abandon_the_others(daemon, slides, tmp_path):
    _, endpoint, _ = daemon
    path, um_per_px = slides
    outside = tmp_path / "outside.png"
    outside.write_bytes(path.read_bytes())
    run = cytoedge("submit", path, outside, "--endpoint", endpoint, "--timeout", "120", "--um-per-px", str(um_per_px))
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    cells = [line for line in lines if line.split("\t")[1].isdigit()]
    assert cells and all(line.startswith(f"{path}\t") for line in cells)
    assert lines[-1].startswith(f"{path}\t") and f"cells={len(cells)}" in lines[-1]
    refusal = [line for line in run.stderr.splitlines() if str(outside.resolve()) in line]
    assert refusal and "PATH_REFUSED" in refusal[0] and "outside the configured roots" in refusal[0]
    assert "Traceback" not in run.stderr


def test_submit_to_a_dead_endpoint_gives_up_within_its_connect_timeout(slides):
    endpoint = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    run = cytoedge("submit", slides[0], "--endpoint", endpoint, "--connect-timeout", "2", timeout=60)
    elapsed = time.monotonic() - start
    assert run.returncode == 2
    assert "TIMEOUT" in run.stderr and "HELLO" in run.stderr and endpoint in run.stderr
    assert "Traceback" not in run.stderr
    assert elapsed < 2 + 20  # the timeout, plus the interpreter's start and imports


def test_serve_stops_cleanly_on_sigterm(daemon):
    proc, _, stderr = daemon
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "Traceback" not in stderr.read_text()
