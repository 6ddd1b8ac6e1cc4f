"""kill -9 of a daemon subprocess mid-job, restart on the same journal and port: the client still gets
every cell exactly once (consecutive sequence numbers, records equal to an independent computation,
SUMMARY digest checked) — for a slide-file job and for a job whose tiles are streamed in-band.
Uses the TEST-ONLY PixelStatsScorer (test_service_support.py) with a per-cell delay."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.client import ScannerLinkClient
from test_service_daemon import write_slide
from test_service_support import block_records, free_port

SUPPORT = Path(__file__).with_name("test_service_support.py")


class DaemonProcess:
    def __init__(self, tmp_path: Path, delay_s: float):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.config = tmp_path / "serve.json"
        self.config.write_text(json.dumps({"endpoint": self.endpoint, "roots": [str(tmp_path / "slides")],
                                           "journal": str(tmp_path / "journal.sqlite3"), "window": 64}))
        self.delay_s, self.log = delay_s, tmp_path / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(SUPPORT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(SUPPORT), str(self.config), str(self.delay_s)],
                                         stdout=log, stderr=log, env=env)

    def events(self) -> list[dict]:
        """The daemon's structured log lines (JSON), across restarts."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def daemon_process(tmp_path):
    process = DaemonProcess(tmp_path, delay_s=0.006)
    process.start()
    yield process
    process.stop()


def collect_across_a_crash(client: ScannerLinkClient, job: str, daemon: DaemonProcess, kill_at: int) -> tuple[list, dict]:
    cells, summaries = [], []
    for event in client.events([job]):
        if event.kind == "cell":
            cells.append(event)
            if len(cells) == kill_at:
                daemon.kill9()
                time.sleep(0.2)
                daemon.start()
        else:
            summaries.append(event)
    assert len(summaries) == 1
    return cells, summaries[0]


def test_kill_9_mid_slide_then_restart_delivers_every_cell_once(tmp_path, daemon_process):
    path, rgb = write_slide(tmp_path / "slides", "slide.png", 21, shape=(256, 320))
    expected = block_records(rgb, (0, 0))
    with ScannerLinkClient(daemon_process.endpoint, timeout_s=30, resume_after_s=0.5) as client:
        client.hello()
        job = client.submit_path(path)
        cells, summary = collect_across_a_crash(client, job, daemon_process, kill_at=20)
    assert [c.seq for c in cells] == list(range(1, len(expected) + 1))
    assert [c.record for c in cells] == expected
    assert summary.digest_ok is True and summary.header["cells"] == len(expected)
    assert summary.header["digest"] == P.records_digest(P.encode_record(r) for r in expected)
    opened = [e for e in daemon_process.events() if e["message"] == "journal opened"]
    assert [e["requeued"] for e in opened] == [0, 1]  # the kill came while the slide was being scored


def test_kill_9_mid_stream_then_restart_keeps_journaled_tiles(tmp_path, daemon_process):
    (tmp_path / "slides").mkdir()
    rgb = np.random.default_rng(22).integers(0, 256, (64, 64 * 12, 3), dtype=np.uint8)
    tiles = [(rgb[:, 64 * k:64 * (k + 1)], (64 * k, 0)) for k in range(12)]
    expected = [r for tile, origin in tiles for r in block_records(tile, origin)]
    with ScannerLinkClient(daemon_process.endpoint, timeout_s=30, resume_after_s=0.5) as client:
        job = client.open_stream("scan", um_per_px=0.25, request_id="slide-7")
        for k, (tile, origin) in enumerate(tiles[:8]):
            client.send_tile(job, k, tile, origin)
        daemon_process.kill9()  # tiles 0-7 are journaled (ACCEPTED); some are not scored yet
        daemon_process.start()
        assert client.open_stream("scan", um_per_px=0.25, request_id="slide-7") == job  # idempotent re-SUBMIT
        for k, (tile, origin) in enumerate(tiles[6:], start=6):  # the scanner resends from where it was unsure
            client.send_tile(job, k, tile, origin)
        client.end_of_slide(job, len(tiles))
        events = list(client.events([job]))
    cells = [e for e in events if e.kind == "cell"]
    assert [c.seq for c in cells] == list(range(1, len(expected) + 1))
    assert [c.record for c in cells] == expected
    assert events[-1].kind == "summary" and events[-1].digest_ok is True
    opened = [e for e in daemon_process.events() if e["message"] == "journal opened"]
    assert len(opened) == 2 and opened[1]["unfinished"] == 1


def test_a_tile_that_kills_the_daemon_fails_its_job_after_max_stalls_restarts(tmp_path, daemon_process):
    """The poison pill: the daemon dies while scoring the tile, every time it is restarted; after
    max_stalls (3) such deaths without a new cell the job is failed and the daemon serves the rest."""
    from test_service_support import POISON_ORIGIN

    path, rgb = write_slide(tmp_path / "slides", "after.png", 23)
    with ScannerLinkClient(daemon_process.endpoint, timeout_s=30, resume_after_s=0.5) as client:
        job = client.open_stream("poison", um_per_px=0.25)
        client.send_tile(job, 0, np.zeros((32, 32, 3), np.uint8), POISON_ORIGIN)
        for _ in range(3):
            daemon_process.proc.wait(timeout=20)  # it dies scoring the tile
            daemon_process.start()
        records, summary = client.wait_result(client.submit_path(path))
        assert daemon_process.proc.poll() is None
        cells, failed = client.wait_result(job)
    assert records == block_records(rgb, (0, 0))
    assert cells == [] and failed["state"] == "failed" and failed["error"]["code"] == P.FAILED_CRASHED
    opened = [e for e in daemon_process.events() if e["message"] == "journal opened"]
    assert [e["crashed"] for e in opened] == [[], [], [], [job]]
