"""The scanner-link commands: `cytoedge watch`, `cytoedge submit` (streaming), `cytoedge serve` refusals.
Daemons here use the TEST-ONLY PixelStatsScorer (test_service_support.py)."""
from __future__ import annotations

import json

from cytoedge.runtime.cli import main
from cytoedge.runtime.service.client import ScannerLinkClient
from test_service_daemon import running_daemon, write_slide
from test_service_support import block_records


def test_watch_resumes_a_job_from_a_stored_sequence_number(tmp_path, capsys):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 41)
    expected = block_records(rgb, (0, 0))
    with running_daemon(tmp_path) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            job = client.submit_path(path)
            client.wait_result(job)
        assert main(["watch", job, "--endpoint", daemon.endpoint, "--from-seq", "5", "--json-lines",
                     "--timeout", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    cells = [d for d in lines if d["event"] == "cell"]
    assert [d["seq"] for d in cells] == list(range(6, len(expected) + 1))
    assert [d["record"] for d in cells] == expected[5:]
    assert lines[-1]["event"] == "summary" and lines[-1]["cells"] == len(expected)


def test_submit_streams_cells_and_reports_refusals(tmp_path, capsys):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 42)
    with running_daemon(tmp_path) as daemon:
        assert main(["submit", str(path), "--endpoint", daemon.endpoint, "--timeout", "10"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert main(["submit", "/etc/hostname", "--endpoint", daemon.endpoint, "--timeout", "10"]) == 1
        refused = capsys.readouterr().err
    expected = block_records(rgb, (0, 0))
    assert [line.split("\t")[2] for line in out[:-1]] == [r["class"] for r in expected]
    state, count = out[-1].split("\t")[1:3]
    assert state in ("scored", "delivered") and count == f"cells={len(expected)}"
    assert "PATH_REFUSED" in refused and "outside the configured roots" in refused


def test_serve_refuses_an_unsafe_configuration_before_loading_the_model(capsys):
    assert main(["serve", "--endpoint", "tcp://0.0.0.0:5590"]) == 2
    assert "CURVE is required" in capsys.readouterr().err
