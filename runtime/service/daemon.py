"""``cytoedge serve``: the scanner-link daemon (ROUTER socket, journal, one scoring worker).

Threads: the *socket thread* owns the ROUTER socket — it decodes and answers every message,
journals jobs, tiles and acknowledgements, and sends journaled cells within each job's credit.
The *worker thread* scores: it takes the oldest work from the journal (the journal is the bounded
queue: SUBMIT beyond ``max_jobs`` unfinished jobs and TILE beyond ``max_pending_tiles`` unscored
tiles are answered BUSY), commits each cell before anyone can send it, and wakes the socket
thread over an inproc PAIR socket. Only the socket thread touches the ROUTER socket.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cytoedge.runtime import __version__
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.config import ServiceConfig
from cytoedge.runtime.service.scoring import JobScorer, ScorerFactory

log = logging.getLogger(__name__)

POLL_MS = 100
COMMIT_MAX = 1024  # most cells per journal commit (one fsync); fewer whenever the scorer pauses
PROGRESS_EVERY_S = 0.5
PURGE_EVERY_S = 3600.0
# what a scorer (numpy, OpenCV, a backend, JSON encoding of its records) raises on a fault
SCORER_FAULTS = (OSError, ValueError, TypeError, KeyError, IndexError, ArithmeticError, MemoryError, RuntimeError)


class NondeterministicScorer(CytoedgeError):
    """Scoring a job again after a restart produced a record that differs from the journaled one."""


@dataclass
class Attachment:
    """Where a job's results go: the peer's routing id and the next sequence number to send."""

    peer: bytes
    next_seq: int
    summary_sent: bool = False
    last_progress: float = 0.0


class Daemon:
    """Serve ``config.endpoint`` until ``stop()``; ``ready`` is set once bound (``endpoint`` is then the real one)."""

    def __init__(self, config: ServiceConfig, scorer_factory: ScorerFactory):
        self.config = config
        self.scorer_factory = scorer_factory
        self.instance = uuid.uuid4().hex
        self.ready = threading.Event()
        self.endpoint = config.endpoint
        self._stop = threading.Event()
        self._work = threading.Event()
        self._started = time.monotonic()
        self._attached: dict[str, Attachment] = {}
        self._wake_endpoint = f"inproc://cytoedge-wake-{self.instance}"

    def stop(self) -> None:
        self._stop.set()
        self._work.set()

    # ------------------------------------------------------------------ socket thread
    def serve(self) -> None:
        """Bind, resume unfinished jobs, and answer messages until stop(). Cleans up on any exit."""
        cfg = self.config
        self.journal = J.Journal(cfg.journal)
        requeued = self.journal.requeue_interrupted()
        purged = self.journal.purge(cfg.retain_s)
        unfinished = self.journal.unfinished_jobs()
        log.info("journal opened", extra={"event": "journal", "path": str(cfg.journal), "requeued": requeued,
                                           "purged": purged, "unfinished": len(unfinished)})
        ctx = zmq.Context()
        auth: ThreadAuthenticator | None = None
        router = wake = None
        worker = threading.Thread(target=self._worker_main, args=(ctx,), name="cytoedge-scoring", daemon=True)
        try:
            router = ctx.socket(zmq.ROUTER)
            P.apply_socket_options(router, cfg.heartbeat_ivl_ms, cfg.heartbeat_timeout_ms)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished peer raises EHOSTUNREACH instead of a silent drop
            router.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            if cfg.curve_enabled:
                auth = self._start_curve(ctx, router)
            try:
                router.bind(cfg.endpoint)
            except zmq.ZMQError as e:
                raise CytoedgeError(f"cannot listen on {cfg.endpoint}: {e}") from None
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            wake = ctx.socket(zmq.PAIR)
            wake.setsockopt(zmq.LINGER, 0)
            wake.bind(self._wake_endpoint)
            worker.start()
            self._work.set()
            log.info("listening", extra={"event": "listening", "endpoint": self.endpoint, "curve": cfg.curve_enabled,
                                         "instance": self.instance})
            self.ready.set()
            self._loop(router, wake)
        finally:
            self._stop.set()
            self._work.set()
            if worker.is_alive():
                worker.join(timeout=30)
            for sock in (router, wake):
                if sock is not None:
                    sock.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self.journal.close()
            self.scorer_factory.close()
            log.info("stopped", extra={"event": "stopped", "instance": self.instance})

    def _start_curve(self, ctx: zmq.Context, router: zmq.Socket) -> ThreadAuthenticator:
        """CURVE server: the ZAP authenticator (client-key allow-list) must run and the server keys be
        set before bind(), so no connection is ever accepted in plain text or from an unknown key."""
        cfg = self.config
        public, secret = zmq.auth.load_certificate(str(cfg.curve_secret_key))
        if secret is None:
            raise CytoedgeError(f"{cfg.curve_secret_key}: holds no secret key (use the .key_secret file)")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(cfg.curve_allowed_keys))
        router.setsockopt(zmq.CURVE_SECRETKEY, secret)
        router.setsockopt(zmq.CURVE_PUBLICKEY, public)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        return auth

    def _loop(self, router: zmq.Socket, wake: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        last_purge = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(POLL_MS))
            if router in events:
                for _ in range(1000):  # drain what is queued, but come back to the worker's wake-ups
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self._on_message(router, frames)
            if wake in events:
                woken = set()
                while True:
                    try:
                        woken.add(wake.recv(zmq.NOBLOCK).decode("ascii"))
                    except zmq.Again:
                        break
                for job_id in woken:
                    self._pump(router, job_id)
            if not events:
                for job_id in list(self._attached):
                    self._pump(router, job_id)
            if time.monotonic() - last_purge > PURGE_EVERY_S:
                self.journal.purge(self.config.retain_s)
                last_purge = time.monotonic()

    def _send(self, router: zmq.Socket, peer: bytes, command: str, header: dict,
              payload: tuple[bytes, ...] = ()) -> bool:
        """Send to ``peer``; False when it is gone (EHOSTUNREACH) or not reading (HWM reached)."""
        try:
            router.send_multipart([peer, *P.encode(command, header, payload)], zmq.NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            gone = [job_id for job_id, a in self._attached.items() if a.peer == peer]
            for job_id in gone:  # its jobs wait in the journal for a RESUME
                del self._attached[job_id]
            log.info("peer gone", extra={"event": "peer_gone", "jobs": gone})
            return False
        return True

    def _error(self, router: zmq.Socket, peer: bytes, code: str, message: str, **extra: object) -> None:
        header = {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
        log.info("refused", extra={"event": "error", "code": code, "detail": message[:200]})
        self._send(router, peer, P.ERROR, header)

    def _on_message(self, router: zmq.Socket, frames: list[bytes]) -> None:
        peer, body = frames[0], frames[1:]
        command = job_id = None
        try:
            msg = P.decode(body, "client", self.config.max_header_bytes)
            command, job_id = msg.command, msg.header.get("job_id")
            handler = getattr(self, f"_on_{msg.command.lower()}")
            handler(router, peer, msg)
        except P.ProtocolError as e:
            extra = {"supported_versions": list(P.SUPPORTED_VERSIONS)} if e.code == P.UNSUPPORTED_VERSION else {}
            self._error(router, peer, e.code, str(e), command=e.command or command, job_id=job_id, **extra)
        except (CytoedgeError, sqlite3.Error, OSError, ValueError, KeyError, TypeError) as e:
            log.exception("internal error handling %s", command)
            self._error(router, peer, P.INTERNAL, f"{command}: {type(e).__name__}: {e}", command=command)

    # --- handlers ---------------------------------------------------------------------------
    def _on_hello(self, router, peer, msg: P.Message) -> None:
        if P.PROTOCOL_VERSION not in msg.header["versions"]:
            raise P.ProtocolError(P.UNSUPPORTED_VERSION, f"client speaks {msg.header['versions']}; this server speaks "
                                                         f"{list(P.SUPPORTED_VERSIONS)}", P.HELLO)
        cfg = self.config
        self._send(router, peer, P.HELLO, {
            "version": P.PROTOCOL_VERSION, "server": f"cytoedge {__version__}", "instance": self.instance,
            "capabilities": list(P.CAPABILITIES), "model": self.scorer_factory.identity(),
            "limits": {"max_header_bytes": cfg.max_header_bytes, "max_message_bytes": cfg.max_message_bytes,
                       "max_tile_pixels": cfg.max_tile_pixels, "max_jobs": cfg.max_jobs,
                       "max_pending_tiles": cfg.max_pending_tiles, "window": cfg.window,
                       "max_window": cfg.max_window}})

    def _job_or_error(self, job_id: str, command: str) -> J.Job:
        job = self.journal.job(job_id)
        if job is None:
            raise P.ProtocolError(P.UNKNOWN_JOB, f"{command}: no job {job_id} (never submitted, or purged)", command)
        return job

    def _window(self, requested: int | None) -> int:
        return min(requested or self.config.window, self.config.max_window)

    def _on_submit(self, router, peer, msg: P.Message) -> None:
        header, source = msg.header, dict(msg.header["source"])
        existing = self.journal.job_by_request(header["request_id"])
        if existing is None:
            if source["kind"] == "path":
                source["path"] = str(self._checked_path(source["path"]))
            if self.journal.count_active() >= self.config.max_jobs:
                raise P.ProtocolError(P.BUSY, f"SUBMIT: {self.config.max_jobs} jobs are already unfinished; retry later",
                                      P.SUBMIT)
        job, duplicate = self.journal.create_job(header["request_id"], source, self._window(header.get("window")))
        if duplicate and job.source["kind"] != source["kind"]:
            raise P.ProtocolError(P.WRONG_STATE, f"SUBMIT: request_id {header['request_id']!r} was used for another "
                                                 "source", P.SUBMIT)
        self._attached[job.job_id] = Attachment(peer, job.acked + 1)
        log.info("job accepted", extra={"event": "accepted", "job_id": job.job_id, "kind": job.kind,
                                        "duplicate": duplicate})
        self._send(router, peer, P.ACCEPTED, {"what": "job", "job_id": job.job_id, "request_id": job.request_id,
                                              "duplicate": duplicate, "window": job.window})
        self._work.set()
        self._pump(router, job.job_id)

    def _checked_path(self, raw: str) -> Path:
        """The resolved slide path, if it lies under a configured root and exists; PATH_REFUSED otherwise."""
        path = Path(raw)
        if not path.is_absolute():
            raise P.ProtocolError(P.PATH_REFUSED, f"SUBMIT: {raw!r} is not an absolute path", P.SUBMIT)
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root) for root in self.config.roots):
            raise P.ProtocolError(P.PATH_REFUSED, f"SUBMIT: {raw!r} is outside the configured roots "
                                                  f"{[str(r) for r in self.config.roots]}", P.SUBMIT)
        if not resolved.exists():
            raise P.ProtocolError(P.PATH_REFUSED, f"SUBMIT: {raw!r} does not exist", P.SUBMIT)
        return resolved

    def _on_tile(self, router, peer, msg: P.Message) -> None:
        header = msg.header
        job = self._job_or_error(header["job_id"], P.TILE)
        if job.kind != "stream" or job.state != J.RECEIVING:
            raise P.ProtocolError(P.WRONG_STATE, f"TILE: job {job.job_id} is a {job.kind} job in state {job.state}; "
                                                 "tiles go to a stream job before its END_OF_SLIDE is scored", P.TILE)
        if job.tiles_expected is not None and header["tile_index"] >= job.tiles_expected:
            raise P.ProtocolError(P.BAD_TILE, f"TILE: index {header['tile_index']} but END_OF_SLIDE said "
                                              f"{job.tiles_expected} tiles", P.TILE)
        if header.get("um_per_px") is None and job.source.get("um_per_px") is None:
            raise P.ProtocolError(P.BAD_HEADER, "TILE: um_per_px is needed (neither the tile nor the job gives it)", P.TILE)
        P.tile_pixels(header, msg.payload[0], self.config.max_tile_pixels)
        if self.journal.pending_tiles() >= self.config.max_pending_tiles:
            raise P.ProtocolError(P.BUSY, f"TILE: {self.config.max_pending_tiles} tiles are waiting to be scored; "
                                          "resend this tile later", P.TILE)
        added = self.journal.add_tile(job.job_id, header["tile_index"], header, msg.payload[0])
        attachment = self._attached.get(job.job_id)
        if attachment is None or attachment.peer != peer:
            self._attached[job.job_id] = Attachment(peer, job.acked + 1)
        self._send(router, peer, P.ACCEPTED, {"what": "tile", "job_id": job.job_id, "tile_index": header["tile_index"],
                                              "duplicate": not added})
        self._work.set()

    def _on_end_of_slide(self, router, peer, msg: P.Message) -> None:
        job = self._job_or_error(msg.header["job_id"], P.END_OF_SLIDE)
        if job.kind != "stream":
            raise P.ProtocolError(P.WRONG_STATE, f"END_OF_SLIDE: job {job.job_id} is not a stream job", P.END_OF_SLIDE)
        received, _ = self.journal.tile_counts(job.job_id)
        if job.state == J.RECEIVING:
            if received > msg.header["tiles"]:
                raise P.ProtocolError(P.BAD_TILE, f"END_OF_SLIDE: says {msg.header['tiles']} tiles but {received} "
                                                  "were received", P.END_OF_SLIDE)
            self.journal.set_tiles_expected(job.job_id, msg.header["tiles"])
        self._attached.setdefault(job.job_id, Attachment(peer, job.acked + 1)).peer = peer
        self._progress(router, peer, job.job_id)
        self._work.set()

    def _on_cancel(self, router, peer, msg: P.Message) -> None:
        job = self._job_or_error(msg.header["job_id"], P.CANCEL)
        if job.state in J.ACTIVE:
            self.journal.request_cancel(job.job_id)
            self._work.set()
        log.info("cancel requested", extra={"event": "cancel", "job_id": job.job_id, "state": job.state})
        self._progress(router, peer, job.job_id)

    def _on_status(self, router, peer, msg: P.Message) -> None:
        if "job_id" in msg.header:
            self._job_or_error(msg.header["job_id"], P.STATUS)
            self._progress(router, peer, msg.header["job_id"])
            return
        cfg = self.config
        self._send(router, peer, P.STATUS, {
            "instance": self.instance, "active_jobs": self.journal.count_active(), "max_jobs": cfg.max_jobs,
            "pending_tiles": self.journal.pending_tiles(), "max_pending_tiles": cfg.max_pending_tiles,
            "uptime_s": round(time.monotonic() - self._started, 3)})

    def _on_ack(self, router, peer, msg: P.Message) -> None:
        job = self._job_or_error(msg.header["job_id"], P.ACK)
        if msg.header["seq"] > job.cells:
            raise P.ProtocolError(P.BAD_HEADER, f"ACK: seq {msg.header['seq']} but job {job.job_id} has only "
                                                f"{job.cells} cells", P.ACK)
        acked = self.journal.record_ack(job.job_id, msg.header["seq"])
        attachment = self._attached.get(job.job_id)
        if attachment is None:  # e.g. the daemon restarted: the acknowledging peer is where results go
            self._attached[job.job_id] = Attachment(peer, acked + 1)
        elif attachment.peer != peer:
            attachment.peer = peer
        self._pump(router, job.job_id)

    def _on_resume(self, router, peer, msg: P.Message) -> None:
        header = msg.header
        job = self._job_or_error(header["job_id"], P.RESUME)
        if header["last_acked_seq"] > job.cells:
            raise P.ProtocolError(P.BAD_HEADER, f"RESUME: last_acked_seq {header['last_acked_seq']} but job "
                                                f"{job.job_id} has only {job.cells} cells", P.RESUME)
        self.journal.record_ack(job.job_id, header["last_acked_seq"])
        if header.get("window"):
            self.journal.set_window(job.job_id, self._window(header["window"]))
        self._attached[job.job_id] = Attachment(peer, header["last_acked_seq"] + 1)
        log.info("job resumed", extra={"event": "resume", "job_id": job.job_id, "from_seq": header["last_acked_seq"] + 1})
        self._progress(router, peer, job.job_id)
        self._pump(router, job.job_id)

    # --- delivery ---------------------------------------------------------------------------
    def _progress(self, router, peer: bytes, job_id: str) -> None:
        job = self.journal.job(job_id)
        received, scored = self.journal.tile_counts(job_id)
        self._send(router, peer, P.PROGRESS, {"job_id": job_id, "state": job.state, "cells": job.cells,
                                              "acked": job.acked, "tiles_received": received, "tiles_scored": scored})

    def _pump(self, router: zmq.Socket, job_id: str) -> None:
        """Send the job's journaled cells its credit allows, then SUMMARY once it is finished and all sent."""
        attachment = self._attached.get(job_id)
        if attachment is None:
            return
        job = self.journal.job(job_id)
        if job is None:
            self._attached.pop(job_id, None)
            return
        if job.acked >= job.cells and job.state == J.SCORED and self.journal.mark_delivered(job_id):
            log.info("job delivered", extra={"event": "delivered", "job_id": job_id, "cells": job.cells})
            job = self.journal.job(job_id)
        last = min(job.cells, job.acked + job.window)
        if attachment.next_seq <= last:
            for seq, record in self.journal.cells(job_id, attachment.next_seq, last):
                if not self._send(router, attachment.peer, P.CELL, {"job_id": job_id, "seq": seq}, (record,)):
                    return
                attachment.next_seq = seq + 1
        now = time.monotonic()
        if job.state in J.ACTIVE and now - attachment.last_progress > PROGRESS_EVERY_S:
            attachment.last_progress = now
            self._progress(router, attachment.peer, job_id)
        if job.state in J.FINISHED and attachment.next_seq > job.cells and not attachment.summary_sent:
            attachment.summary_sent = self._send(router, attachment.peer, P.SUMMARY, {
                "job_id": job_id, "state": job.state, "cells": job.cells, "digest": job.digest,
                "summary": job.summary, "error": job.error})
        if attachment.summary_sent and job.state == J.DELIVERED:
            self._attached.pop(job_id, None)

    # ------------------------------------------------------------------ worker thread
    def _worker_main(self, ctx: zmq.Context) -> None:
        wake = ctx.socket(zmq.PAIR)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_endpoint)
        journal = J.Journal(self.config.journal)
        worker = _Worker(journal, self.scorer_factory, lambda job_id: _notify(wake, job_id))
        try:
            while not self._stop.is_set():
                self._work.clear()
                try:
                    did_work = worker.step(self._stop)
                except sqlite3.Error:  # e.g. disk full or locked: keep the worker alive, try again shortly
                    log.exception("journal error in the scoring worker")
                    did_work = False
                if not did_work:
                    self._work.wait(timeout=0.5)
        finally:
            wake.close(linger=0)
            journal.close()


def _notify(wake: zmq.Socket, job_id: str) -> None:
    try:
        wake.send(job_id.encode("ascii"), zmq.NOBLOCK)
    except zmq.Again:
        log.debug("wake-up queue full; the socket thread's idle sweep will deliver %s", job_id)


class _RecordFeed:
    """Runs a slide's record iterator in its own thread, so the worker commits whatever is ready the
    moment the scorer pauses: one fsync per burst of results, and no finished record held back
    while the next batch is being computed."""

    _END = object()

    def __init__(self, records: Iterator[dict]):
        self._queue: queue.Queue = queue.Queue(maxsize=4 * COMMIT_MAX)
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self._completed = self._ended = False
        self._thread = threading.Thread(target=self._produce, args=(records,), name="cytoedge-slide", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, records: Iterator[dict]) -> None:
        try:
            for record in records:
                if not self._put(record):
                    return
            self._completed = True
        except (CytoedgeError, *SCORER_FAULTS) as e:  # handed to the worker, which fails the job
            self._error = e
        finally:
            self._put(self._END)

    def take(self, limit: int, stop: threading.Event) -> list[dict] | None:
        """The next records (waits for at least one, takes at most ``limit``); None after the last one,
        [] when ``stop`` is set. Re-raises what the scorer raised."""
        if self._ended:
            return self._end()
        batch: list[dict] = []
        while not batch:
            if stop.is_set():
                return []
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if item is self._END:
                self._ended = True
                return self._end()
            batch.append(item)
        while len(batch) < limit:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is self._END:
                self._ended = True
                break
            batch.append(item)
        return batch

    def _end(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._completed:
            raise CytoedgeError("the slide scorer stopped without finishing or saying why")
        return None

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=60)


class _JobRun:
    """A job being scored in this process: its scorer and how many records it has produced. Records
    up to ``known`` were journaled by an earlier run and are checked, not journaled again."""

    def __init__(self, job: J.Job, scorer: JobScorer):
        self.job_id, self.scorer, self.emitted, self.known = job.job_id, scorer, 0, job.cells
        self.pending: list[bytes] = []


class _Worker:
    """Scores work from the journal; every record is committed before the socket thread is woken."""

    def __init__(self, journal: J.Journal, factory: ScorerFactory, notify):
        self.journal, self.factory, self.notify = journal, factory, notify
        self.streams: dict[str, _JobRun] = {}

    def step(self, stop: threading.Event) -> bool:
        """Do one piece of work; False when there was none."""
        work = self.journal.next_work()
        if work is None:
            return False
        kind, job, ordinal = work
        try:
            if kind == "cancel":
                self._finish(job.job_id, J.CANCELLED)
            elif kind == "job":
                self._score_path_job(job, stop)
            elif kind == "tile":
                self._score_tile(job, ordinal)
            else:
                run = self._stream_run(job)
                self._flush(run)
                self._finish(job.job_id, J.SCORED, summary=run.scorer.summary())
        except CytoedgeError as e:  # a bad input, said so by the scorer
            log.warning("job failed", extra={"event": "failed", "job_id": job.job_id, "detail": str(e)})
            self._finish(job.job_id, J.FAILED, error={"code": type(e).__name__, "message": str(e)})
        except SCORER_FAULTS as e:  # a fault while scoring fails this job, never the daemon
            log.exception("job failed", extra={"event": "failed", "job_id": job.job_id})
            self._finish(job.job_id, J.FAILED, error={"code": type(e).__name__, "message": str(e)})
        return True

    def _emit(self, run: _JobRun, records: list[dict]) -> None:
        for record in records:
            encoded = P.encode_record(record)
            run.emitted += 1
            if run.emitted <= run.known:
                stored = self.journal.cells(run.job_id, run.emitted, run.emitted)
                if not stored or stored[0][1] != encoded:
                    raise NondeterministicScorer(f"job {run.job_id}: cell {run.emitted} scored again differs from "
                                                 "the journaled one; the scorer is not deterministic")
            else:
                run.pending.append(encoded)

    def _flush(self, run: _JobRun) -> None:
        if run.pending:
            self.journal.append_cells(run.job_id, run.emitted - len(run.pending) + 1, run.pending)
            run.pending = []
            self.notify(run.job_id)

    def _finish(self, job_id: str, state: str, summary: dict | None = None, error: dict | None = None) -> None:
        run = self.streams.pop(job_id, None)
        if run is not None and state != J.FAILED:
            self._flush(run)
        digest = P.records_digest(self.journal.all_records(job_id))
        if self.journal.finish(job_id, state, summary=summary, error=error, digest=digest):
            log.info("job finished", extra={"event": state, "job_id": job_id})
        self.notify(job_id)

    def _score_path_job(self, job: J.Job, stop: threading.Event) -> None:
        self.journal.set_scoring(job.job_id)
        self.notify(job.job_id)
        run = _JobRun(job, self.factory.new_job())
        feed = _RecordFeed(run.scorer.score_path(Path(job.source["path"]), job.source.get("um_per_px")))
        try:
            while (records := feed.take(COMMIT_MAX, stop)) is not None:
                self._emit(run, records)
                self._flush(run)
                if stop.is_set() or self.journal.cancel_requested(job.job_id):
                    return  # cancel: handled as its own work item; stop: resumed from the journal on restart
        finally:
            feed.close()
        self._finish(job.job_id, J.SCORED, summary=run.scorer.summary())

    def _stream_run(self, job: J.Job) -> _JobRun:
        """This stream's run, rebuilt after a restart by scoring its already-scored tiles again."""
        run = self.streams.get(job.job_id)
        if run is None:
            run = self.streams[job.job_id] = _JobRun(job, self.factory.new_job())
            for ordinal in self.journal.scored_tiles(job.job_id):
                self._emit(run, self._tile_records(run, job, ordinal))
            self._flush(run)
        return run

    def _tile_records(self, run: _JobRun, job: J.Job, ordinal: int) -> list[dict]:
        header, pixels = self.journal.tile(ordinal)
        h, w, c = header["shape"]
        rgb = np.frombuffer(pixels, dtype=P.TILE_DTYPES[header["dtype"]]).reshape(h, w, c)
        um_per_px = header.get("um_per_px") or job.source["um_per_px"]
        return run.scorer.score_tile(rgb, tuple(header["origin_xy"]), float(um_per_px))

    def _score_tile(self, job: J.Job, ordinal: int) -> None:
        run = self._stream_run(job)
        self._emit(run, self._tile_records(run, job, ordinal))
        self._flush(run)
        self.journal.mark_tile_scored(ordinal)
