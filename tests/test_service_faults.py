"""Faults found by probing the daemon from outside (issue 13), each reproduced and now answered:
a SUBMIT cannot stop the daemon, a scorer fault fails only its job, roots hold at open time,
abandoned streams expire, every bad message gets its own error code, and the client's timeout
counts real progress. Delivery uses the TEST-ONLY PixelStatsScorer (test_service_support.py)."""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.client import ScannerLinkClient, ServiceError
from cytoedge.runtime.service.roots import PathRefused, RootGuard
from test_service_daemon import raw_dealer, recv_reply, running_daemon, write_slide
from test_service_support import PixelStatsJob, PixelStatsScorer, block_records


def ask(endpoint: str, command: bytes, header: bytes, *payload: bytes) -> P.Message:
    with raw_dealer(endpoint) as sock:
        sock.send_multipart([P.VERSION_FRAME, command, header, *payload])
        return recv_reply(sock)


def submit_header(path: str, request_id: str = "r") -> bytes:
    return json.dumps({"request_id": request_id, "source": {"kind": "path", "path": path}}).encode()


def test_symlink_loops_and_malformed_paths_are_refused_and_the_daemon_stays_up(tmp_path):
    slides = tmp_path / "slides"
    path, rgb = write_slide(slides, "a.png", 1)
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    (slides / "inner_loop").symlink_to(slides / "inner_loop")
    with running_daemon(tmp_path) as daemon:
        refused = {
            "loop outside the roots": str(tmp_path / "loop_a" / "x.png"),
            "loop inside the roots": str(slides / "inner_loop"),
            "NUL byte": str(slides) + "/a\x00.png",
            "long component": str(slides / ("n" * 300 + ".png")),
            "relative": "slides/a.png",
            "missing": str(slides / "missing.png"),
        }
        for i, (what, raw) in enumerate(refused.items()):
            reply = ask(daemon.endpoint, b"SUBMIT", submit_header(raw, f"r{i}"))
            assert (reply.command, reply.header["code"]) == (P.ERROR, P.PATH_REFUSED), what
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            records, summary = client.wait_result(client.submit_path(path))
    assert records == block_records(rgb, (0, 0)) and summary["state"] in ("scored", "delivered")


@pytest.mark.parametrize("header, code", [
    ('{"versions":[1],"client":"\\ud800"}'.encode(), P.BAD_JSON),  # a lone surrogate
    ('{"versions":[1]}'.encode("utf-16"), P.BAD_JSON),  # json.loads(bytes) would accept it
    (b'\xef\xbb\xbf{"versions":[1]}', P.BAD_JSON),  # a UTF-8 byte-order mark
    (b'{"versions":[NaN]}', P.BAD_JSON),
    (b'{"versions":[1.0]}', P.BAD_HEADER),
])
def test_headers_must_be_strict_utf8_json(tmp_path, header, code):
    with running_daemon(tmp_path) as daemon:
        reply = ask(daemon.endpoint, b"HELLO", header)
    assert (reply.command, reply.header["code"]) == (P.ERROR, code)


def test_bad_tiles_get_their_own_codes_never_internal(tmp_path):
    with running_daemon(tmp_path) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            stream = client.open_stream("s", um_per_px=0.3)
        tile = {"job_id": stream, "tile_index": 0, "shape": [2, 2, 3], "dtype": "uint8", "origin_xy": [0, 0]}
        cases = [({**tile, "shape": [2.0, 2.0, 3]}, P.BAD_HEADER), ({**tile, "um_per_px": 1000}, P.BAD_HEADER),
                 ({**tile, "um_per_px": 0.001}, P.BAD_HEADER), ({**tile, "shape": [2, 2, 3.0]}, P.BAD_HEADER)]
        for header, code in cases:
            reply = ask(daemon.endpoint, b"TILE", json.dumps(header).encode(), b"\0" * 12)
            assert (reply.command, reply.header["code"]) == (P.ERROR, code), header


def test_a_reused_request_id_with_another_source_is_a_conflict(tmp_path):
    a, _ = write_slide(tmp_path / "slides", "a.png", 2)
    b, _ = write_slide(tmp_path / "slides", "b.png", 3)
    with running_daemon(tmp_path) as daemon:
        first = ask(daemon.endpoint, b"SUBMIT", submit_header(str(a), "same"))
        again = ask(daemon.endpoint, b"SUBMIT", submit_header(str(a), "same"))
        other = ask(daemon.endpoint, b"SUBMIT", submit_header(str(b), "same"))
    assert first.command == P.ACCEPTED and again.header == {**first.header, "duplicate": True}
    assert (other.command, other.header["code"]) == (P.ERROR, P.REQUEST_CONFLICT)
    assert first.header["job_id"] in other.header["message"]


class FaultyJob(PixelStatsJob):
    """TEST-ONLY: a path whose name says so raises what a numerical library might (not a CytoedgeError)."""

    def score_path(self, path, um_per_px, opener):
        records = super().score_path(path, um_per_px, opener)
        if "halfway" in path.name:
            yield next(records)
            yield next(records)
            raise ZeroDivisionError("a fault deep inside the scorer")
        yield from records


class FaultyScorer(PixelStatsScorer):
    def new_job(self) -> FaultyJob:
        return FaultyJob(self.delay_s)


def test_a_scorer_fault_fails_its_job_by_name_and_the_worker_goes_on(tmp_path):
    bad, _ = write_slide(tmp_path / "slides", "halfway.png", 4)
    good, rgb = write_slide(tmp_path / "slides", "good.png", 5)
    with running_daemon(tmp_path, FaultyScorer()) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            bad_job, good_job = client.submit_path(bad), client.submit_path(good)
            bad_cells, bad_summary = client.wait_result(bad_job)
            good_cells, good_summary = client.wait_result(good_job)
            status = client.status()
    assert bad_summary["state"] == "failed" and len(bad_cells) == 2  # the cells it made before the fault
    error = bad_summary["error"]
    assert error["code"] == P.FAILED_SCORING and error["job_id"] == bad_job and error["input"] == str(bad)
    assert str(bad) in error["message"] and "ZeroDivisionError" in error["message"]
    assert good_summary["state"] in ("scored", "delivered") and good_cells == block_records(rgb, (0, 0))
    worker = status["workers"][0]
    assert worker["alive"] and worker["jobs_failed"] == 1 and worker["restarts"] == 0


class DyingJob(PixelStatsJob):
    """TEST-ONLY: ends the scoring thread itself (what escapes every handler), to exercise the supervisor."""

    def score_tile(self, rgb, origin_xy, um_per_px):
        if origin_xy == (6666, 6666):
            raise SystemExit("the scoring thread ends here")
        return super().score_tile(rgb, origin_xy, um_per_px)


class DyingScorer(PixelStatsScorer):
    def new_job(self) -> DyingJob:
        return DyingJob(self.delay_s)


def test_a_dead_worker_is_restarted_and_a_job_that_kills_it_each_time_fails(tmp_path):
    good, rgb = write_slide(tmp_path / "slides", "good.png", 6)
    with running_daemon(tmp_path, DyingScorer(), max_stalls=2) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=20) as client:
            stream = client.open_stream("poison", um_per_px=0.3)
            client.send_tile(stream, 0, np.zeros((32, 32, 3), np.uint8), (6666, 6666))
            client.end_of_slide(stream, 1)
            cells, summary = client.wait_result(stream)
            assert summary["state"] == "failed" and summary["error"]["code"] == P.FAILED_CRASHED
            records, after = client.wait_result(client.submit_path(good))
            status = client.status()
    assert records == block_records(rgb, (0, 0)) and after["state"] in ("scored", "delivered")
    assert status["workers"][0]["alive"] and status["workers"][0]["restarts"] == 2


def test_a_file_swapped_for_a_symlink_after_submit_is_not_read(tmp_path):
    slow, _ = write_slide(tmp_path / "slides", "slow.png", 7, shape=(64, 64))
    swapped, _ = write_slide(tmp_path / "slides", "swapped.png", 8)
    outside, _ = write_slide(tmp_path / "outside", "secret.png", 9)
    with running_daemon(tmp_path, PixelStatsScorer(delay_s=0.05)) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=20) as client:
            first = client.submit_path(slow)  # keeps the worker busy while the file is swapped
            job = client.submit_path(swapped)
            swapped.unlink()
            swapped.symlink_to(outside)
            client.wait_result(first)
            cells, summary = client.wait_result(job)
    assert cells == [] and summary["state"] == "failed"
    assert summary["error"]["code"] == "PathRefused" and "is a symlink" in summary["error"]["message"]


def test_root_guard_reads_only_regular_files_under_the_roots(tmp_path):
    root = tmp_path / "slides"
    inside, _ = write_slide(root, "in.png", 10)
    outside, _ = write_slide(tmp_path / "outside", "out.png", 11)
    (root / "link.png").symlink_to(outside)
    (root / "sub").mkdir()
    (root / "sub" / "up.png").symlink_to(inside)  # a symlink, even to a file inside, is not followed
    guard = RootGuard([root.resolve()])
    with guard.open(inside) as readable:
        assert os.path.samefile(readable, inside)
    for path in (root / "link.png", root / "sub" / "up.png", root / "sub"):
        with pytest.raises(PathRefused):
            with guard.open(path):
                pass


def test_abandoned_streams_expire_free_their_tiles_and_stop_blocking_submit(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 12)
    with running_daemon(tmp_path, max_jobs=3, stream_idle_s=1.0, busy_retry_s=0.25) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            streams = [client.open_stream(f"abandoned-{i}", um_per_px=0.3) for i in range(3)]
            for s in streams:
                client.send_tile(s, 0, np.full((32, 32, 3), 200, np.uint8), (0, 0))
        busy = ask(daemon.endpoint, b"SUBMIT", submit_header(str(path), "late"))
        assert busy.header["code"] == P.BUSY and busy.header["retry_after_s"] == 0.25
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:  # retries as BUSY says, then gets in
            records, _ = client.wait_result(client.submit_path(path, request_id="late"))
            expired = [client.wait_result(s)[1] for s in streams]
        journal = J.Journal(tmp_path / "journal.sqlite3")
        assert journal.db.execute("SELECT COUNT(*) FROM tiles").fetchone()[0] == 0
        journal.close()
    assert records == block_records(rgb, (0, 0))
    assert all(s["state"] == "failed" and s["error"]["code"] == P.FAILED_STREAM_IDLE for s in expired)


def test_abandoned_streams_from_before_a_restart_expire_after_it(tmp_path):
    with running_daemon(tmp_path, max_jobs=2, stream_idle_s=1.0) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            streams = [client.open_stream(f"left-{i}", um_per_px=0.3) for i in range(2)]
    with running_daemon(tmp_path, max_jobs=2, stream_idle_s=1.0) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            assert client.status()["active_jobs"] == 2  # the idle clock starts at the restart
            states = [client.wait_result(s)[1]["state"] for s in streams]
            assert client.status()["active_jobs"] == 0
    assert states == ["failed", "failed"]


def test_tile_pixels_leave_the_journal_once_scored_and_space_is_given_back(tmp_path):
    journal_path = tmp_path / "journal.sqlite3"
    with running_daemon(tmp_path) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=20) as client:
            stream = client.open_stream("big", um_per_px=0.3)
            tile = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
            for k in range(6):  # 19 MB of pixels through a journal that must not keep them
                client.send_tile(stream, k, tile, (0, 1024 * k))
            client.end_of_slide(stream, 6)
            cells, summary = client.wait_result(stream)
        journal = J.Journal(journal_path)
        journal.maintain()
        sizes = journal.sizes()
        journal.close()
    assert summary["state"] in ("scored", "delivered") and len(cells) == 6 * 64 * 64
    assert sizes["db_bytes"] + sizes["wal_bytes"] < 12e6  # the tiles' 19 MB are gone; the 4 MB of cells remain
    assert sizes["free_pages"] < 0.25 * sizes["pages"]


def test_a_stream_goes_on_after_a_restart_from_its_checkpoint_not_its_pixels(tmp_path):
    tiles = [np.random.default_rng(k).integers(0, 256, (32, 48, 3), dtype=np.uint8) for k in range(4)]
    with running_daemon(tmp_path) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            stream = client.open_stream("restart", um_per_px=0.3)
            for k in range(2):
                client.send_tile(stream, k, tiles[k], (0, 32 * k))
            deadline = time.monotonic() + 10
            while client.status(stream)["tiles_scored"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
    with running_daemon(tmp_path) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            for k in range(2, 4):
                client.send_tile(stream, k, tiles[k], (0, 32 * k))
            client.end_of_slide(stream, 4)
            cells, summary = client.wait_result(stream)
    expected = [r for k in range(4) for r in block_records(tiles[k], (0, 32 * k))]
    assert cells == expected
    assert summary["summary"] == {"cells": len(expected),
                                  "classes": {c: sum(r["class"] == c for r in expected) for c in ("bright", "dark")}}


class StuckJob(PixelStatsJob):
    """TEST-ONLY: never finishes (a scorer waiting on a device that does not answer)."""

    release = threading.Event()

    def score_path(self, path, um_per_px, opener):
        self.release.wait(30)
        yield from ()


class StuckScorer(PixelStatsScorer):
    def new_job(self) -> StuckJob:
        return StuckJob(0.0)


def test_client_timeout_counts_progress_not_keepalives(tmp_path):
    path, _ = write_slide(tmp_path / "slides", "a.png", 13)
    with running_daemon(tmp_path, StuckScorer()) as daemon:
        try:
            with ScannerLinkClient(daemon.endpoint, timeout_s=1.5) as client:
                job = client.submit_path(path)
                started = time.monotonic()
                with pytest.raises(ServiceError) as raised:
                    client.wait_result(job)
                waited = time.monotonic() - started
                status = client.status()
        finally:
            StuckJob.release.set()
    assert raised.value.code == "TIMEOUT" and 1.4 < waited < 4.0
    worker = status["workers"][0]
    assert worker["job_id"] == job and worker["input"] == str(path.resolve()) and worker["busy_s"] > 1.0


def test_a_folder_slide_read_through_the_guard_skips_a_symlink_that_leaves_the_roots(tmp_path):
    from cytoedge.runtime.sources import open_source

    root = tmp_path / "slides"
    inside, rgb = write_slide(root / "fields", "a.png", 14)
    outside, _ = write_slide(tmp_path / "outside", "secret.png", 15)
    (root / "fields" / "b.png").symlink_to(outside)
    source = open_source(root / "fields", opener=RootGuard([root.resolve()]).open)
    tiles = list(source.tiles(4096, 0))
    assert [t.field for t in tiles] == [str(inside)] and np.array_equal(tiles[0].rgb, rgb)
    assert [f["source"] for f in source.failures] == [str(root / "fields" / "b.png")]
    assert "is a symlink" in source.failures[0]["error"]
