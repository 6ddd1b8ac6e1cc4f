"""Faults the scanner link survives: fuzzed frames, kill -9 under load, a soak with abandoned streams.

  python benchmarks/bench_service_faults.py [--frames 10000] [--kills 20] [--clients 4] [--jobs 1000] [--write]

Each daemon is its own process on loopback (the real Daemon, journal and worker) with a
BENCHMARK-ONLY deterministic scorer (no model): a path job's file holds how many cells to emit,
a tile gives one record per 16-px row band with the band's real mean, so every delivered record
is checked against what it must be, and a record delivered twice or missing is counted.

- fuzz: malformed, hostile and out-of-range messages of every kind found by probing the daemon
  (symlink loops, NUL bytes, UTF-16 headers, lone surrogates, float shapes, huge scales, reused
  request ids, …); each must get exactly one ERROR, none INTERNAL, and the daemon must stay up;
- kill -9: ``--clients`` threads run path jobs and streamed slides while the daemon is killed
  at random moments and restarted on the same journal; every cell must arrive exactly once;
- soak: ``--jobs`` jobs (path jobs, streams, and every 10th stream abandoned), with the daemon's
  RSS and journal size sampled; abandoned streams must expire and no job may stay unfinished.

``tests/test_service_fault_bench.py`` runs a bounded part of each in CI.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BAND = 16
RETAIN_S = 5.0  # soak: finished jobs are purged this soon, so the journal reaches its steady size within the run


# ---------------------------------------------------------------- the daemon under test
class BandScorer:
    """BENCHMARK-ONLY ScorerFactory (see the module docstring); ``delay_s`` per record."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def identity(self) -> dict:
        return {"name": "band-test-scorer", "bundle_sha256": "0" * 64, "backend": "numpy", "estimator": "bands"}

    def tile_refusal(self, height: int, width: int, um_per_px: float) -> str | None:
        return None

    def new_job(self) -> "_BandJob":
        return _BandJob(self.delay_s)

    def close(self) -> None:
        pass


def path_records(name: str, n: int) -> list[dict]:
    return [{"id": i, "slide": name, "class": "lymphocyte" if i % 3 else "neutrophil"} for i in range(n)]


def tile_records(rgb: np.ndarray, origin_xy: tuple[int, int]) -> list[dict]:
    return [{"x": origin_xy[0], "y": origin_xy[1] + y, "mean": round(float(rgb[y:y + BAND].mean()), 4)}
            for y in range(0, rgb.shape[0] - BAND + 1, BAND)]


class _BandJob:
    def __init__(self, delay_s: float):
        self.delay_s, self.cells = delay_s, 0

    def score_path(self, path: Path, um_per_px, opener):
        with opener(path) as readable:
            n = int(Path(readable).read_text())
        for record in path_records(path.name, n):
            if self.delay_s:
                time.sleep(self.delay_s)
            self.cells += 1
            yield record

    def score_tile(self, rgb, origin_xy, um_per_px):
        if self.delay_s:
            time.sleep(self.delay_s * 4)
        records = tile_records(rgb, origin_xy)
        self.cells += len(records)
        return records

    def summary(self) -> dict:
        return {"cells": self.cells}

    def checkpoint(self) -> dict:
        return {"cells": self.cells}

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        self.cells = checkpoint["cells"]


def run_daemon(config_path: str, delay_s: float) -> int:
    import logging

    from cytoedge.runtime.service.config import load_config
    from cytoedge.runtime.service.daemon import Daemon

    logging.basicConfig(level=logging.WARNING)
    daemon = Daemon(load_config(Path(config_path), {}), BandScorer(delay_s))
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    daemon.serve()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """The daemon as a subprocess on a fixed port and journal, restartable after kill -9."""

    def __init__(self, work: Path, delay_s: float = 0.0, **settings):
        self.work, self.delay_s = work, delay_s
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.journal = work / "journal.sqlite3"
        self.config = work / "serve.json"
        self.config.write_text(json.dumps({"endpoint": self.endpoint, "roots": [str(work / "slides")],
                                           "journal": str(self.journal), **settings}))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.work / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, __file__, "--daemon", str(self.config), str(self.delay_s)],
                                         stdout=log, stderr=log)
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def journal_mib(self) -> float:
        return sum(p.stat().st_size for p in self.work.glob("journal.sqlite3*")) / 2 ** 20


def wait_ready(endpoint: str, timeout_s: float = 30.0) -> None:
    from cytoedge.runtime.service.client import ScannerLinkClient

    with ScannerLinkClient(endpoint, timeout_s=timeout_s) as client:
        client.hello(timeout_s=timeout_s)


# ---------------------------------------------------------------- fuzz
def fuzz_messages(rng: np.random.Generator, work: Path, stream: str, good_path: str, n: int) -> list[list[bytes]]:
    """``n`` messages, each of which must be refused with an ERROR (never INTERNAL)."""
    slides = work / "slides"
    loop = work / "loop"
    if not loop.exists():
        loop.symlink_to(loop)
        (slides / "inner_loop").symlink_to(slides / "inner_loop")
    tile = {"job_id": stream, "tile_index": 0, "shape": [4, 4, 3], "dtype": "uint8", "origin_xy": [0, 0]}

    def submit(path: str, request_id: str = "fuzz") -> bytes:
        return json.dumps({"request_id": request_id, "source": {"kind": "path", "path": path}}).encode()

    hostile = [
        [b"1", b"SUBMIT", submit(str(loop / "x.png"), "loop-out")],
        [b"1", b"SUBMIT", submit(str(slides / "inner_loop"), "loop-in")],
        [b"1", b"SUBMIT", submit(str(slides) + "/a\x00b.png", "nul")],
        [b"1", b"SUBMIT", submit(str(slides / ("n" * 300)), "long")],
        [b"1", b"SUBMIT", submit("relative/a.png", "rel")],
        [b"1", b"SUBMIT", submit("/etc/hostname", "outside")],
        [b"1", b"SUBMIT", submit(str(slides / "missing.png"), "missing")],
        [b"1", b"SUBMIT", submit(good_path + "x", "conflict")],  # request id "conflict" is taken by good_path
        [b"1", b"SUBMIT", json.dumps({"request_id": "s", "source": {"kind": "stream", "name": "x",
                                                                    "um_per_px": 1000}}).encode()],
        [b"1", b"HELLO", '{"versions":[1],"client":"\\udc80"}'.encode()],
        [b"1", b"HELLO", '{"versions":[1]}'.encode("utf-16")],
        [b"1", b"HELLO", '{"versions":[1]}'.encode("utf-32")],
        [b"1", b"HELLO", b'\xef\xbb\xbf{"versions":[1]}'],
        [b"1", b"HELLO", b'{"versions":[NaN]}'],
        [b"1", b"HELLO", b'{"versions":[Infinity]}'],
        [b"1", b"TILE", json.dumps({**tile, "shape": [2.0, 2.0, 3]}).encode(), b"\0" * 12],
        [b"1", b"TILE", json.dumps({**tile, "shape": [2, 2, 3.0]}).encode(), b"\0" * 12],
        [b"1", b"TILE", json.dumps({**tile, "um_per_px": 1000}).encode(), b"\0" * 48],
        [b"1", b"TILE", json.dumps({**tile, "um_per_px": 0}).encode(), b"\0" * 48],
        [b"1", b"TILE", json.dumps({**tile, "shape": [60000, 60000, 3]}).encode(), b"\0" * 10],
        [b"1", b"TILE", json.dumps(tile).encode(), b"\0" * 47],
        [b"1", b"TILE", json.dumps(tile).encode()],
        [b"1", b"ACK", json.dumps({"job_id": stream, "seq": 10 ** 6}).encode()],
        [b"1", b"RESUME", json.dumps({"job_id": stream, "last_acked_seq": 10 ** 6}).encode()],
        [b"1", b"END_OF_SLIDE", json.dumps({"job_id": "0" * 32, "tiles": 1}).encode()],
        [b"1", b"STATUS", json.dumps({"job_id": "f" * 32}).encode()],
        [b"1", b"STATUS", b'{"pad":"' + b"x" * 5000 + b'"}'],
        [b"1", b"STATUS", b"{}", b"payload"],
        [b"1", b"NOPE", b"{}"],
        [b"9", b"HELLO", b'{"versions":[1]}'],
        [b"1", b"HELLO"],
        [b"1", b"HELLO", b"[1, 2"],
        [b"1", b"HELLO", b"[" * 5000],
        [b"1", b"HELLO", b'{"versions":[1],"extra":1}'],
    ]
    messages = []
    for i in range(n):
        kind = int(rng.integers(0, len(hostile) + 3))
        if kind < len(hostile):
            messages.append(hostile[kind])
        elif kind == len(hostile):  # random bytes in every frame
            messages.append([rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(3, 6)))])
        elif kind == len(hostile) + 1:  # a valid SUBMIT header with random bytes flipped
            body = bytearray(submit(good_path, f"flip-{i}"))
            for _ in range(3):
                body[int(rng.integers(0, len(body)))] = int(rng.integers(0, 256))
            messages.append([b"1", b"SUBMIT", bytes(body), b"extra"])  # the extra frame keeps it an error
        else:  # JSON values that are not header objects
            value = [None, True, 3, 2.5, "s", []][i % 6]
            messages.append([b"1", [b"HELLO", b"SUBMIT", b"TILE", b"ACK"][i % 4], json.dumps(value).encode()])
    return messages


def bench_fuzz(work: Path, frames: int, seed: int = 7) -> dict:
    from cytoedge.runtime.service import protocol as P
    from cytoedge.runtime.service.client import ScannerLinkClient
    import zmq

    (work / "slides").mkdir(parents=True, exist_ok=True)
    good = work / "slides" / "good.txt"
    good.write_text("5")
    daemon = DaemonProcess(work, max_header_bytes=4096, max_tile_pixels=256 * 256)
    daemon.start()
    codes: dict[str, int] = {}
    unanswered = 0
    try:
        wait_ready(daemon.endpoint)
        with ScannerLinkClient(daemon.endpoint, timeout_s=30) as client:
            stream = client.open_stream("fuzz-target", um_per_px=0.3)
            client.submit_path(good, request_id="conflict")
        messages = fuzz_messages(np.random.default_rng(seed), work, stream, str(good), frames)
        t0 = time.perf_counter()
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        try:
            for start in range(0, len(messages), 200):
                batch = messages[start:start + 200]
                for frames_ in batch:
                    sock.send_multipart(frames_)
                for _ in batch:
                    if not sock.poll(10_000):
                        unanswered += 1
                        continue
                    reply = P.decode(sock.recv_multipart(), "server", 1 << 24)
                    code = reply.header.get("code", reply.command) if reply.command == P.ERROR else reply.command
                    codes[code] = codes.get(code, 0) + 1
            extra = 0
            while sock.poll(300):
                sock.recv_multipart()
                extra += 1
        finally:
            sock.close(linger=0)
            ctx.term()
        seconds = time.perf_counter() - t0
        alive = daemon.alive()
        with ScannerLinkClient(daemon.endpoint, timeout_s=30) as client:
            records, summary = client.wait_result(client.submit_path(good, request_id="after-fuzz"))
        still_serves = records == path_records(good.name, 5)
    finally:
        rc = daemon.stop()
    return {"frames": frames, "answered": sum(codes.values()), "unanswered": unanswered, "extra_replies": extra,
            "codes": dict(sorted(codes.items())), "internal": codes.get("INTERNAL", 0), "alive": alive,
            "still_serves": still_serves, "exit_code": rc, "seconds": seconds}


# ---------------------------------------------------------------- kill -9
class _Client(threading.Thread):
    """Runs path jobs and streams in turn until told to stop; checks every record it is handed."""

    def __init__(self, k: int, endpoint: str, slides: Path, stop: threading.Event, rounds: int):
        super().__init__(name=f"client-{k}", daemon=True)
        self.k, self.endpoint, self.slides, self.stop_event, self.rounds = k, endpoint, slides, stop, rounds
        self.cells = self.duplicates = self.wrong = self.jobs = 0
        self.failures: list[str] = []

    def run(self) -> None:
        from cytoedge.runtime.service.client import ScannerLinkClient

        rng = np.random.default_rng(self.k)
        try:
            with ScannerLinkClient(self.endpoint, timeout_s=120, resume_after_s=1.0) as client:
                for r in range(self.rounds):
                    if self.stop_event.is_set():
                        break
                    if r % 2 == 0:
                        self._path_job(client, r, int(rng.integers(40, 120)))
                    else:
                        self._stream(client, r, rng)
                    self.jobs += 1
        except Exception as e:  # reported, not raised: the bench counts it
            self.failures.append(f"client {self.k}: {type(e).__name__}: {e}")

    def _collect(self, client, job: str, expected: list[dict]) -> None:
        got = []
        for event in client.events([job]):
            if event.kind == "cell":
                got.append(event.record)
            elif event.digest_ok is False:
                self.failures.append(f"job {job}: digest mismatch")
            elif event.header["state"] not in ("scored", "delivered"):
                self.failures.append(f"job {job}: {event.header['state']} {event.header.get('error')}")
        self.cells += len(got)
        self.duplicates += max(0, len(got) - len({json.dumps(g, sort_keys=True) for g in got}))
        if got != expected:
            self.wrong += 1
            self.failures.append(f"job {job}: {len(got)} records, expected {len(expected)}")

    def _path_job(self, client, r: int, n: int) -> None:
        path = self.slides / f"c{self.k}-r{r}.txt"
        path.write_text(str(n))
        job = client.submit_path(path, request_id=f"c{self.k}-r{r}")
        self._collect(client, job, path_records(path.name, n))

    def _stream(self, client, r: int, rng: np.random.Generator) -> None:
        job = client.open_stream(f"c{self.k}-r{r}", um_per_px=0.3, request_id=f"c{self.k}-s{r}")
        tiles = [rng.integers(0, 256, (96, 64, 3), dtype=np.uint8) for _ in range(int(rng.integers(3, 8)))]
        expected = []
        for t, rgb in enumerate(tiles):
            client.send_tile(job, t, rgb, (0, 96 * t))
            expected.extend(tile_records(rgb, (0, 96 * t)))
        client.end_of_slide(job, len(tiles))
        self._collect(client, job, expected)


def bench_kill9(work: Path, kills: int, clients: int, seed: int = 3) -> dict:
    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(work, delay_s=0.004, window=64, max_jobs=64)
    daemon.start()
    wait_ready(daemon.endpoint)
    stop = threading.Event()
    threads = [_Client(k, daemon.endpoint, slides, stop, rounds=10 ** 6) for k in range(clients)]
    for t in threads:
        t.start()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 2.0))
            daemon.kill9()
            time.sleep(rng.uniform(0.0, 0.5))
            daemon.start()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(timeout=300)
    finally:
        stop.set()
        rc = daemon.stop()
    return {"kills": kills, "clients": clients, "seconds": time.perf_counter() - t0,
            "jobs": sum(t.jobs for t in threads), "cells": sum(t.cells for t in threads),
            "duplicates": sum(t.duplicates for t in threads), "wrong_jobs": sum(t.wrong for t in threads),
            "failures": [f for t in threads for f in t.failures], "hung_clients": sum(t.is_alive() for t in threads),
            "exit_code": rc}


# ---------------------------------------------------------------- soak
def bench_soak(work: Path, jobs: int, idle_s: float = 2.0) -> dict:
    from cytoedge.runtime.service.client import ScannerLinkClient

    slides = work / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(work, max_jobs=16, stream_idle_s=idle_s, retain_s=RETAIN_S)
    daemon.start()
    wait_ready(daemon.endpoint)
    rng = np.random.default_rng(11)
    samples, abandoned, expired, finished, bad = [], [], [], 0, []
    tile = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)  # 768 KB a tile: pixels that must not pile up
    t0 = time.perf_counter()
    try:
        with ScannerLinkClient(daemon.endpoint, timeout_s=120) as client:
            samples.append((0, daemon.rss_mib(), daemon.journal_mib()))
            for k in range(jobs):
                if k % 10 == 9:  # a scanner that crashed mid-slide: one tile, never an END_OF_SLIDE
                    job = client.open_stream(f"abandoned-{k}", um_per_px=0.3)
                    client.send_tile(job, 0, tile, (0, 0))
                    abandoned.append((job, time.monotonic()))
                elif k % 3 == 0:
                    job = client.open_stream(f"stream-{k}", um_per_px=0.3)
                    for t in range(3):
                        client.send_tile(job, t, tile, (0, 512 * t))
                    client.end_of_slide(job, 3)
                    _, summary = client.wait_result(job)
                    finished += summary["state"] in ("scored", "delivered")
                else:
                    path = slides / f"job{k:05d}.txt"
                    path.write_text("50")
                    records, summary = client.wait_result(client.submit_path(path))
                    finished += summary["state"] in ("scored", "delivered") and records == path_records(path.name, 50)
                    path.unlink()
                # collect the expired streams while their results are retained (retain_s)
                while abandoned and time.monotonic() - abandoned[0][1] > idle_s + 1.0:
                    expired.append(client.wait_result(abandoned.pop(0)[0])[1])
                if (k + 1) % 100 == 0:
                    samples.append((k + 1, daemon.rss_mib(), daemon.journal_mib()))
            expired += [client.wait_result(job)[1] for job, _ in abandoned]
            bad = [s for s in expired if s["state"] != "failed" or (s.get("error") or {}).get("code") != "STREAM_IDLE"]
            status = client.status()
    finally:
        rc = daemon.stop()
    return {"jobs": jobs, "finished": finished, "abandoned": len(expired), "expired_wrongly": len(bad),
            "active_after": status["active_jobs"], "pending_tiles_after": status["pending_tiles"],
            "samples": samples, "seconds": time.perf_counter() - t0, "idle_s": idle_s, "exit_code": rc}


# ---------------------------------------------------------------- report
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.daemon:
        return run_daemon(args.daemon[0], float(args.daemon[1]))
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d3:
        fuzz = bench_fuzz(Path(d1), args.frames)
        print("fuzz", fuzz, flush=True)
        kill = bench_kill9(Path(d2), args.kills, args.clients)
        print("kill9", kill, flush=True)
        soak = bench_soak(Path(d3), args.jobs)
        print("soak", soak, flush=True)
    first, last = soak["samples"][1] if len(soak["samples"]) > 1 else soak["samples"][0], soak["samples"][-1]
    body = f"""Daemon in its own process on loopback (the real Daemon, journal and supervised worker) with a
benchmark-only deterministic scorer (no model), so every delivered record is checked against what it
must be. 2 shared CPU cores (a training job ran beside it).

| fault | result |
|---|---|
| {fuzz['frames']:,} fuzzed frames (hostile paths: symlink loops, NUL, 300-byte names, outside the roots; UTF-16/32, BOM, NaN, lone surrogates; float shapes, µm/px 0 and 1000; a reused request_id; random bytes, …) | answered {fuzz['answered']:,}, unanswered {fuzz['unanswered']}, extra replies {fuzz['extra_replies']}; **INTERNAL {fuzz['internal']}**; daemon alive {fuzz['alive']}, scores a slide afterwards {fuzz['still_serves']}, exit code on SIGTERM {fuzz['exit_code']}; codes {fuzz['codes']} |
| {kill['kills']} × kill -9 at random moments (0.3–2 s apart) with {kill['clients']} concurrent clients running path jobs and streamed slides, restarted on the same journal | {kill['jobs']} jobs, {kill['cells']:,} cells delivered; **duplicates {kill['duplicates']}, jobs with a missing or wrong record {kill['wrong_jobs']}**, failed jobs {len(kill['failures'])}, clients hung {kill['hung_clients']} ({kill['seconds']:.0f} s) |
| soak: {soak['jobs']} jobs (path jobs of 50 cells, streams of 3 × 512² tiles, every 10th stream abandoned after one tile; `stream_idle_s` {soak['idle_s']:g}, `retain_s` {RETAIN_S:g}) | finished {soak['finished']}, abandoned {soak['abandoned']} all expired as STREAM_IDLE ({soak['expired_wrongly']} otherwise); active jobs after: {soak['active_after']}, pending tiles: {soak['pending_tiles_after']}; RSS {first[1]:.1f} → {last[1]:.1f} MiB and journal {first[2]:.1f} → {last[2]:.1f} MiB from job {first[0]} to {last[0]} ({soak['seconds']:.0f} s) |

Soak samples (jobs, RSS MiB, journal MiB): {', '.join(f'({n}, {r:.1f}, {j:.1f})' for n, r, j in soak['samples'])}.
"""
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("service-faults", "Scanner link: faults survived", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
