"""Scanner-link benchmarks: CELL delivery rate, tile → result latency, daemon memory over a soak.

  python benchmarks/bench_service.py [--cells 20000] [--fields 12] [--jobs 1000] [--write]

Every daemon runs as its own process on loopback, and the client is the reference client.
- delivery: a BENCHMARK-ONLY synthetic scorer (fixed ~1 KB records, no model) emits the cells,
  so the number is the protocol + journal (commit before send) + client ACK cost alone;
- latency: the real model (`cytoedge serve`, ONNX Runtime CPU, fast estimator, 1 thread):
  one in-band tile per synthetic smear field, time from sending the tile to its last cell;
- soak: 1,000 path jobs through the synthetic scorer, daemon RSS sampled every 100 jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


RECORD_PAD = "x" * 900  # a real cell record (class, probabilities, flags, audit…) is about 1 KB of JSON


class SyntheticRecordScorer:
    """BENCHMARK-ONLY ScorerFactory: a path job's file holds the number of cells to emit."""

    def identity(self) -> dict:
        return {"name": "synthetic-records", "bundle_sha256": "0" * 64, "backend": "none", "estimator": "none"}

    def tile_refusal(self, height: int, width: int, um_per_px: float) -> str | None:
        return None

    def new_job(self):
        return _SyntheticJob()

    def close(self) -> None:
        pass


class _SyntheticJob:
    def __init__(self):
        self.n = 0

    def score_path(self, path: Path, um_per_px: float | None, opener):
        with opener(path) as readable:
            n = int(Path(readable).read_text())
        for i in range(n):
            self.n += 1
            yield {"id": i, "class": "lymphocyte", "pad": RECORD_PAD}

    def score_tile(self, rgb, origin_xy, um_per_px):
        self.n += 1
        return [{"id": self.n, "class": "lymphocyte", "mean": float(rgb.mean())}]

    def summary(self) -> dict:
        return {"cells": self.n}

    def checkpoint(self) -> dict:
        return {"n": self.n}

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        self.n = checkpoint["n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=f, env=env)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def synthetic_daemon(work: Path, window: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = work / "serve.json"
    config.write_text(json.dumps({"endpoint": endpoint, "roots": [str(work)], "journal": str(work / "journal.sqlite3"),
                                  "window": window, "max_jobs": 64}))
    return start([sys.executable, __file__, "--daemon", str(config)], work / "daemon.log"), endpoint


def bench_delivery(work: Path, cells: int) -> dict:
    from cytoedge.runtime.service.client import ScannerLinkClient

    (work / "slide.txt").write_text(str(cells))
    proc, endpoint = synthetic_daemon(work, window=1024)
    try:
        with ScannerLinkClient(endpoint, timeout_s=120) as client:
            client.hello()
            t0 = time.perf_counter()
            job = client.submit_path(work / "slide.txt")
            first = None
            n = 0
            for event in client.events([job]):
                if event.kind == "cell":
                    n += 1
                    first = first or time.perf_counter()
                elif not event.digest_ok:
                    raise RuntimeError("SUMMARY digest does not match the cells received")
            t1 = time.perf_counter()
    finally:
        stop(proc)
    return {"cells": n, "seconds": t1 - t0, "per_s": n / (t1 - t0), "first_cell_ms": (first - t0) * 1000}


def bench_latency(work: Path, fields: int) -> dict:
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.service import protocol as P
    from cytoedge.runtime.service.client import ScannerLinkClient
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    bundle = ModelBundle.load(default_bundle_path())
    backend = OnnxRuntimeBackend(bundle, threads=1)
    smears = [generate_smear(bundle, backend, SmearSpec(n_white=4, ddim_steps=5, seed=100 + k)) for k in range(fields)]
    local = SlideScorer(bundle, backend, "fast", ScoringOptions(heatmaps=False))
    expected, local_ms = [], []  # cells each field will give, and what scoring it in-process takes
    for smear in smears:
        t0 = time.perf_counter()
        expected.append(len(local.score_tile(smear.rgb, (0, 0), smear.um_per_px)))
        local_ms.append((time.perf_counter() - t0) * 1000)
    backend.close()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start([sys.executable, "-m", "cytoedge.runtime.cli", "serve", "--endpoint", endpoint, "--roots", str(work),
                  "--journal", str(work / "model-journal.sqlite3"), "--threads", "1", "--no-heatmaps"],
                 work / "serve.log")
    latencies = []
    try:
        with ScannerLinkClient(endpoint, timeout_s=120) as client:
            client.hello()
            job = client.open_stream("latency", um_per_px=smears[0].um_per_px)
            got = 0
            for k, smear in enumerate(smears):
                t0 = time.perf_counter()
                client.send_tile(job, k, smear.rgb, (k * smear.rgb.shape[1], 0))
                target = got + expected[k]
                while got < target:
                    msg = client.recv(100)
                    if msg is not None and msg.command == P.CELL:
                        got += 1
                        client.send(P.ACK, {"job_id": job, "seq": msg.header["seq"]})
                latencies.append((time.perf_counter() - t0) * 1000)
            client.end_of_slide(job, len(smears))
    finally:
        stop(proc)
    return {"fields": fields, "cells": sum(expected), "ms": latencies, "local_ms": local_ms}


def bench_soak(work: Path, jobs: int, cells_per_job: int) -> dict:
    from cytoedge.runtime.service.client import ScannerLinkClient

    for k in range(jobs):
        (work / f"job{k:04d}.txt").write_text(str(cells_per_job))
    proc, endpoint = synthetic_daemon(work, window=256)
    samples = []
    try:
        with ScannerLinkClient(endpoint, timeout_s=120) as client:
            client.hello()
            samples.append((0, rss_mib(proc.pid)))
            t0 = time.perf_counter()
            for start_k in range(0, jobs, 4):  # 4 jobs in flight at a time
                ids = [client.submit_path(work / f"job{k:04d}.txt") for k in range(start_k, min(start_k + 4, jobs))]
                for event in client.events(ids):
                    if event.kind == "summary" and not event.digest_ok:
                        raise RuntimeError("digest mismatch")
                done = min(start_k + 4, jobs)
                if done % 100 == 0:
                    samples.append((done, rss_mib(proc.pid)))
            seconds = time.perf_counter() - t0
    finally:
        stop(proc)
    return {"jobs": jobs, "cells_per_job": cells_per_job, "seconds": seconds, "rss": samples,
            "journal_mib": sum(p.stat().st_size for p in work.glob("journal.sqlite3*")) / 2 ** 20}


def run_daemon(config_path: str) -> int:
    import logging

    from cytoedge.runtime.service.config import load_config
    from cytoedge.runtime.service.daemon import Daemon

    logging.basicConfig(level=logging.WARNING)
    daemon = Daemon(load_config(Path(config_path), {}), SyntheticRecordScorer())
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    daemon.serve()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--daemon", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cells", type=int, default=20000, help="cells in the delivery-rate job")
    ap.add_argument("--fields", type=int, default=12, help="in-band fields for the latency test (real model)")
    ap.add_argument("--jobs", type=int, default=1000, help="jobs in the memory soak")
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.daemon:
        return run_daemon(args.daemon)
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d3:
        delivery = bench_delivery(Path(d1), args.cells)
        print("delivery", delivery, flush=True)
        latency = bench_latency(Path(d2), args.fields)
        print("latency", latency, flush=True)
        soak = bench_soak(Path(d3), args.jobs, 50)
        print("soak", soak, flush=True)
    ms = sorted(latency["ms"])
    rss = soak["rss"]
    body = f"""Loopback TCP, daemon in its own process, reference Python client, journal on local disk (SQLite WAL,
synchronous=FULL). Delivery and soak use a benchmark-only synthetic scorer (~1 KB records, no model) so
they measure the protocol, the journal and the client; latency uses the real model. The 2 CPU cores are
shared with a training job and other work, so the times are indicative (±30 %).

| measure | result |
|---|---|
| CELL delivery, one job of {delivery['cells']} cells, window 1024 | **{delivery['per_s']:,.0f} cells/s** ({delivery['seconds']:.2f} s, first cell after {delivery['first_cell_ms']:.0f} ms); each cell journaled before it is sent, ACKed, digest checked |
| last tile of a field → all its cells received (real model: ONNX Runtime CPU, 1 thread, fast estimator, no heatmaps; {latency['fields']} synthetic fields of 360×360 px, {latency['cells']} white cells) | median **{statistics.median(ms):.0f} ms**, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms; the same fields scored in-process (SlideScorer.score_tile, no socket, no journal): median {statistics.median(latency['local_ms']):.0f} ms |
| daemon RSS over a {soak['jobs']}-job soak ({soak['cells_per_job']} cells each, 4 jobs in flight, {soak['seconds']:.0f} s) | {', '.join(f'{n} jobs: {m:.1f} MiB' for n, m in rss)} |
| journal size after the soak (finished jobs kept for `retain_s`, 7 days by default) | {soak['journal_mib']:.1f} MiB |
"""
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("scanner-link", "Scanner link", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
