"""The scanner-link daemon on real loopback sockets: round trips, fuzzing, RESUME, concurrency, safety.

Delivery tests use the TEST-ONLY PixelStatsScorer (test_service_support.py): every record is a
real statistic of the submitted pixels, so each delivered cell is checked against an independent
computation. test_service_model.py runs the real model path.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq
import zmq.auth

from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.client import CurveKeys, ScannerLinkClient, ServiceError
from cytoedge.runtime.service.config import ConfigError, ServiceConfig, load_config
from cytoedge.runtime.service.daemon import Daemon
from test_service_support import PixelStatsScorer, block_records


@contextlib.contextmanager
def running_daemon(tmp_path: Path, scorer=None, **settings):
    config = ServiceConfig(**{"endpoint": "tcp://127.0.0.1:0", "roots": [tmp_path / "slides"],
                              "journal": tmp_path / "journal.sqlite3", **settings}).check()
    daemon = Daemon(config, scorer or PixelStatsScorer())
    thread = threading.Thread(target=daemon.serve, name="test-daemon")
    thread.start()
    try:
        if not daemon.ready.wait(10):
            raise RuntimeError("daemon did not start")
        yield daemon
    finally:
        daemon.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()


def write_slide(folder: Path, name: str, seed: int, shape=(96, 128)) -> tuple[Path, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    path = folder / name
    cv2.imwrite(str(path), rgb[..., ::-1])
    return path, rgb


@contextlib.contextmanager
def raw_dealer(endpoint: str):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def recv_reply(sock: zmq.Socket, timeout_ms: int = 5000) -> P.Message:
    if not sock.poll(timeout_ms):
        raise TimeoutError("no reply")
    return P.decode(sock.recv_multipart(), "server", 1 << 24)


def test_round_trip_path_and_stream(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 1)
    with running_daemon(tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
        hello = client.hello()
        assert hello["version"] == 1 and hello["model"]["name"] == "pixel-stats-test-scorer"
        job = client.submit_path(path)
        records, summary = client.wait_result(job)
        expected = block_records(rgb, (0, 0))
        assert records == expected
        assert summary["cells"] == len(expected) and summary["state"] in ("scored", "delivered")
        assert summary["digest"] == P.records_digest(P.encode_record(r) for r in expected)
        assert summary["summary"]["cells"] == len(expected)

        stream = client.open_stream("scan-1", um_per_px=0.25)
        tiles = [(rgb[:48, :64], (0, 0)), (rgb[:48, 64:], (64, 0)), (rgb[48:, :64], (0, 48)), (rgb[48:, 64:], (64, 48))]
        for index, (tile, origin) in enumerate(tiles):
            assert client.send_tile(stream, index, tile, origin) is False
        assert client.send_tile(stream, 1, tiles[1][0], tiles[1][1]) is True  # a resent tile is not scored twice
        client.end_of_slide(stream, len(tiles))
        records, summary = client.wait_result(stream)
        assert records == [r for tile, origin in tiles for r in block_records(tile, origin)]
        assert client.status()["active_jobs"] == 0


def test_submit_is_idempotent_per_request_id(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 2)
    with running_daemon(tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
        first = client.submit_path(path, request_id="scanner-slide-42")
        assert client.submit_path(path, request_id="scanner-slide-42") == first
        records, _ = client.wait_result(first)
        assert len(records) == len(block_records(rgb, (0, 0)))


def _fuzz_messages(rng: np.random.Generator, job_id: str, n: int) -> list[list[bytes]]:
    """n messages, every one of them invalid in a different way (seeded)."""
    valid_tile = {"job_id": job_id, "tile_index": 0, "shape": [4, 4, 3], "dtype": "uint8", "origin_xy": [0, 0]}
    wrong_types = [
        (P.HELLO, {"versions": "1"}), (P.HELLO, {"versions": []}), (P.HELLO, {"versions": [99]}),
        (P.SUBMIT, {"request_id": 7, "source": {"kind": "path", "path": "/x"}}),
        (P.SUBMIT, {"request_id": "r", "source": {"kind": "tape"}}),
        (P.SUBMIT, {"request_id": "r", "source": {"kind": "stream", "name": "s", "um_per_px": -1}}),
        (P.ACK, {"job_id": job_id, "seq": -1}), (P.ACK, {"job_id": "0" * 32, "seq": 1}),
        (P.ACK, {"job_id": job_id, "seq": 10 ** 9}), (P.RESUME, {"job_id": "zz", "last_acked_seq": 0}),
        (P.RESUME, {"job_id": job_id, "last_acked_seq": 10 ** 6}), (P.CANCEL, {}), (P.STATUS, {"job_id": 5}),
        (P.END_OF_SLIDE, {"job_id": job_id, "tiles": "all"}), (P.STATUS, []), (P.ACK, None),
        (P.TILE, {**valid_tile, "dtype": "float64"}), (P.TILE, {**valid_tile, "shape": [4, 4, 4]}),
        (P.SUBMIT, {"request_id": "r", "source": {"kind": "path", "path": "/x"}, "extra": 1}),
    ]
    def pick(options: list):
        return options[int(rng.integers(len(options)))]

    messages = []
    for i in range(n):
        kind = i % 9
        if kind == 0:  # random frames
            messages.append([rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 5)))])
        elif kind == 1:  # malformed JSON
            junk = pick([b"{", b"[1,2", b"\xff\xfe", b"{'a': 1}", b"nul", b"", b"{\"a\":}", b"[" * 5000])
            messages.append([P.VERSION_FRAME, pick([c.encode() for c in P.CLIENT_COMMANDS]), junk])
        elif kind == 2:  # valid JSON, wrong types or values
            command, header = wrong_types[int(rng.integers(len(wrong_types)))]
            frames = [P.VERSION_FRAME, command.encode(), json.dumps(header).encode()]
            messages.append(frames + ([b"\0" * 48] if command == P.TILE else []))
        elif kind == 3:  # unknown versions
            messages.append([pick([b"0", b"2", b"v1", b"\x01", b"11"]), b"HELLO", b'{"versions":[1]}'])
        elif kind == 4:  # unknown commands
            messages.append([P.VERSION_FRAME, pick([b"hello", b"CELL", b"SUMMARY", b"\x00", b"DELETE"]), b"{}"])
        elif kind == 5:  # header over the size limit
            messages.append([P.VERSION_FRAME, b"STATUS", b'{"pad":"' + b"x" * 5000 + b'"}'])
        elif kind == 6:  # tiles claiming huge shapes, or pixels that do not match the shape
            shape = [[60000, 60000, 3], [4, 4, 3]][i % 2]
            frames = [P.VERSION_FRAME, b"TILE", json.dumps({**valid_tile, "shape": shape}).encode(), b"\0" * 10]
            messages.append(frames)
        elif kind == 7:  # wrong number of frames for the command
            messages.append([P.VERSION_FRAME, b"TILE", json.dumps(valid_tile).encode()])
        else:  # a valid header followed by unexpected payload
            messages.append([P.VERSION_FRAME, b"STATUS", b"{}", b"payload"])
    return messages


def test_fuzzed_frames_each_get_an_error_and_the_daemon_stays_up(tmp_path):
    rng = np.random.default_rng(7)
    path, rgb = write_slide(tmp_path / "slides", "a.png", 3)
    with running_daemon(tmp_path, max_header_bytes=4096, max_tile_pixels=256 * 256) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            stream = client.open_stream("fuzz-target", um_per_px=0.3)
        messages = _fuzz_messages(rng, stream, 10_000)
        codes: dict[str, int] = {}
        with raw_dealer(daemon.endpoint) as sock:
            for start in range(0, len(messages), 250):
                batch = messages[start:start + 250]
                for frames in batch:
                    sock.send_multipart(frames)
                for _ in batch:
                    reply = recv_reply(sock)
                    assert reply.command == P.ERROR, reply
                    codes[reply.header["code"]] = codes.get(reply.header["code"], 0) + 1
            assert not sock.poll(200), "more replies than messages"
        assert sum(codes.values()) == 10_000
        assert {P.BAD_FRAMES, P.BAD_JSON, P.BAD_HEADER, P.UNSUPPORTED_VERSION, P.UNKNOWN_COMMAND, P.TOO_LARGE,
                P.BAD_TILE, P.UNKNOWN_JOB} <= set(codes)
        assert P.INTERNAL not in codes
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            records, _ = client.wait_result(client.submit_path(path))
            assert records == block_records(rgb, (0, 0))


def test_frame_over_the_size_limit_drops_only_that_peer(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 4)
    with running_daemon(tmp_path, max_header_bytes=1024, max_tile_pixels=32 * 32) as daemon:
        with raw_dealer(daemon.endpoint) as sock:
            sock.send_multipart([P.VERSION_FRAME, b"STATUS", b"{}"])
            assert recv_reply(sock).command == P.STATUS
            sock.send_multipart([P.VERSION_FRAME, b"STATUS", b"{}", b"\0" * 200_000])  # > ZMQ_MAXMSGSIZE
            assert not sock.poll(500)
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            assert client.wait_result(client.submit_path(path))[0] == block_records(rgb, (0, 0))


def test_disconnect_and_resume_delivers_the_rest_exactly_once(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "a.png", 5, shape=(128, 160))
    expected = [P.encode_record(r) for r in block_records(rgb, (0, 0))]
    with running_daemon(tmp_path) as daemon:
        first = ScannerLinkClient(daemon.endpoint, timeout_s=10)
        job = first.submit_path(path, window=8)
        seen: list[bytes] = []
        for event in first.events([job]):
            seen.append(event.raw)
            if len(seen) == 11:
                break
        first.close()  # acknowledged up to 8 at most (window), 11 handed out: the gap must be resent, once
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as second:
            status = second.status(job)
            assert status["acked"] <= 11
            resumed = list(second.events([job], last_acked={job: 11}))
        cells = [e for e in resumed if e.kind == "cell"]
        assert [e.seq for e in cells] == list(range(12, len(expected) + 1))
        assert seen + [e.raw for e in cells] == expected
        summary = resumed[-1]
        assert summary.kind == "summary" and summary.digest_ok is None
        assert summary.header["digest"] == P.records_digest(seen + [e.raw for e in cells])


def test_four_concurrent_clients_with_several_slides_each(tmp_path):
    slides = {f"s{i}.png": write_slide(tmp_path / "slides", f"s{i}.png", 100 + i, shape=(64 + 16 * i, 96)) for i in range(12)}
    results: dict[str, list[dict]] = {}
    errors: list[BaseException] = []

    def client_main(names: list[str]) -> None:
        try:
            with ScannerLinkClient(daemon.endpoint, timeout_s=20) as client:
                jobs = {client.submit_path(slides[n][0]): n for n in names}
                got: dict[str, list[dict]] = {j: [] for j in jobs}
                for event in client.events(list(jobs)):
                    if event.kind == "cell":
                        got[event.job_id].append(event.record)
                    else:
                        assert event.digest_ok is True
                results.update({jobs[j]: r for j, r in got.items()})
        except BaseException as e:  # collected and re-raised in the test thread
            errors.append(e)

    with running_daemon(tmp_path, window=16) as daemon:
        names = sorted(slides)
        threads = [threading.Thread(target=client_main, args=(names[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert sorted(results) == sorted(slides)
    for name, (_, rgb) in slides.items():
        assert results[name] == block_records(rgb, (0, 0)), name


def test_full_queue_answers_busy(tmp_path):
    paths = [write_slide(tmp_path / "slides", f"b{i}.png", 10 + i)[0] for i in range(2)]
    with running_daemon(tmp_path, PixelStatsScorer(delay_s=0.01), max_jobs=1) as daemon:
        with raw_dealer(daemon.endpoint) as sock:
            for i, path in enumerate(paths):
                sock.send_multipart(P.encode(P.SUBMIT, {"request_id": f"r{i}", "source": {"kind": "path", "path": str(path)}}))
            replies = []
            while len(replies) < 2:
                msg = recv_reply(sock)
                if msg.command in (P.ACCEPTED, P.ERROR):
                    replies.append(msg)
            assert replies[0].command == P.ACCEPTED
            assert replies[1].command == P.ERROR and replies[1].header["code"] == P.BUSY


def test_path_outside_roots_is_refused(tmp_path):
    write_slide(tmp_path / "slides", "a.png", 6)
    outside, _ = write_slide(tmp_path / "elsewhere", "secret.png", 6)
    with running_daemon(tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=5) as client:
        for path in (outside, tmp_path / "slides" / ".." / "elsewhere" / "secret.png", Path("/etc/passwd")):
            with pytest.raises(ServiceError) as refused:
                client._request(P.SUBMIT, {"request_id": str(path), "source": {"kind": "path", "path": str(path)}},
                                (P.ACCEPTED,))
            assert refused.value.code == P.PATH_REFUSED
        (tmp_path / "slides" / "link.png").symlink_to(outside)
        with pytest.raises(ServiceError, match="outside the configured roots"):
            client.submit_path(tmp_path / "slides" / "link.png")
        assert client.status()["active_jobs"] == 0


def test_failed_slide_reports_its_error_in_the_summary(tmp_path):
    bad = tmp_path / "slides" / "x.bad"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a slide")
    with running_daemon(tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=5) as client:
        records, summary = client.wait_result(client.submit_path(bad))
        assert records == [] and summary["state"] == "failed"
        assert "not a slide this scorer reads" in summary["error"]["message"]


def test_curve_accepts_listed_keys_and_rejects_unknown_ones(tmp_path):
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    known_public, known_secret = zmq.auth.create_certificates(str(keys), "scanner")
    _, stranger_secret = zmq.auth.create_certificates(str(keys), "stranger")
    Path(known_public).rename(allowed / "scanner.key")
    with running_daemon(tmp_path, curve_secret_key=Path(server_secret), curve_allowed_keys=allowed) as daemon:
        good = CurveKeys.from_files(server_public, known_secret)
        with ScannerLinkClient(daemon.endpoint, curve=good, timeout_s=5) as client:
            assert client.hello()["version"] == 1
        for curve in (CurveKeys.from_files(server_public, stranger_secret), None):
            with ScannerLinkClient(daemon.endpoint, curve=curve, timeout_s=1.0) as client:
                with pytest.raises(ServiceError) as refused:
                    client.hello()
                assert refused.value.code == "TIMEOUT"


def test_config_refuses_unsafe_settings(tmp_path):
    with pytest.raises(ConfigError, match="CURVE is required"):
        ServiceConfig(endpoint="tcp://0.0.0.0:5590").check()
    with pytest.raises(ConfigError, match="unknown configuration key"):
        load_config(None, {"endpoit": "tcp://127.0.0.1:1"})
    config_file = tmp_path / "serve.json"
    config_file.write_text(json.dumps({"endpoint": "ipc://" + str(tmp_path / "s.ipc"), "roots": [str(tmp_path)],
                                       "window": 32}))
    config = load_config(config_file, {"window": 64})
    assert config.window == 64 and config.roots == [tmp_path.resolve()]


def test_ipc_endpoint_and_cancel(tmp_path):
    path, rgb = write_slide(tmp_path / "slides", "big.png", 8, shape=(256, 256))
    endpoint = "ipc://" + str(tmp_path / "cytoedge.ipc")
    with running_daemon(tmp_path, PixelStatsScorer(delay_s=0.002), endpoint=endpoint) as daemon:
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            job = client.submit_path(path)
            events = client.events([job])
            first = next(events)
            assert first.kind == "cell" and first.seq == 1
            client.cancel(job)
            rest = list(events)
        cells = [first] + [e for e in rest if e.kind == "cell"]
        summary = rest[-1]
        assert summary.kind == "summary" and summary.header["state"] == "cancelled"
        assert 1 <= len(cells) < len(block_records(rgb, (0, 0)))
        assert summary.header["cells"] == len(cells) and summary.digest_ok is True


def test_results_arrive_while_tiles_are_still_being_sent(tmp_path):
    _, rgb = write_slide(tmp_path / "slides", "a.png", 9, shape=(64, 64 * 8))
    tiles = [(rgb[:, 64 * k:64 * (k + 1)], (64 * k, 0)) for k in range(8)]
    with running_daemon(tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
        job = client.open_stream("live", um_per_px=0.25)
        other = client.open_stream("other", um_per_px=0.25)
        client.send_tile(other, 0, tiles[0][0], tiles[0][1])
        live: list = []
        for k, (tile, origin) in enumerate(tiles):
            client.send_tile(job, k, tile, origin)
            deadline = time.monotonic() + 5
            while len(live) < 16 * (k + 1) and time.monotonic() < deadline:  # this tile's cells, before the next tile
                live += [e for e in client.ready([job]) if e.kind == "cell"]
            assert len(live) == 16 * (k + 1)
        client.end_of_slide(job, len(tiles))
        client.end_of_slide(other, 1)
        rest = list(client.events([job, other]))
    assert [e.seq for e in live] == list(range(1, 129))
    assert [e.record for e in live] == [r for tile, origin in tiles for r in block_records(tile, origin)]
    other_cells = [e.record for e in rest if e.kind == "cell" and e.job_id == other]
    assert other_cells == block_records(tiles[0][0], tiles[0][1])  # kept while the other job was read
    assert sorted(e.job_id for e in rest if e.kind == "summary") == sorted([job, other])


def test_unusable_journal_or_endpoint_is_a_clear_error(tmp_path):
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.service.journal import Journal

    not_a_db = tmp_path / "journal.sqlite3"
    not_a_db.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(CytoedgeError, match="journal.sqlite3: cannot open it"):
        Journal(not_a_db)
    with running_daemon(tmp_path / "a") as daemon:
        config = ServiceConfig(endpoint=daemon.endpoint, journal=tmp_path / "b.sqlite3").check()
        with pytest.raises(CytoedgeError, match="cannot listen on"):
            Daemon(config, PixelStatsScorer()).serve()


FROZEN_CLIENT = """
import sys, time
from cytoedge.runtime.service.client import ScannerLinkClient
client = ScannerLinkClient(sys.argv[1], timeout_s=10)
print(client.submit_path(sys.argv[2], window=4), flush=True)
time.sleep(60)
"""


def test_heartbeats_detect_a_frozen_client_and_resume_recovers(tmp_path, caplog):
    import signal
    import subprocess
    import sys

    path, rgb = write_slide(tmp_path / "slides", "a.png", 31, shape=(256, 256))  # still scoring when frozen
    caplog.set_level("INFO", logger="cytoedge.runtime.service")
    with running_daemon(tmp_path, PixelStatsScorer(delay_s=0.005), heartbeat_ivl_ms=100,
                        heartbeat_timeout_ms=300) as daemon:
        frozen = subprocess.Popen([sys.executable, "-c", FROZEN_CLIENT, daemon.endpoint, str(path)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            job = frozen.stdout.readline().strip()
            frozen.send_signal(signal.SIGSTOP)  # alive for TCP, silent for ZMTP: only heartbeats can tell
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(r.getMessage() == "peer gone" for r in caplog.records):
                time.sleep(0.05)
        finally:
            frozen.kill()
            frozen.wait(timeout=10)
        gone = [r for r in caplog.records if r.getMessage() == "peer gone"]
        assert gone and gone[0].jobs == [job]
        with ScannerLinkClient(daemon.endpoint, timeout_s=10) as client:
            records = [e.record for e in client.events([job], attach=True) if e.kind == "cell"]
    assert records == block_records(rgb, (0, 0))
