"""``cytoedge serve``: the scanner-link daemon — admission of requests over the three parts it wires.

- transport.py: the ROUTER socket (frames, size limit, CURVE) and the worker's wake-up socket;
- delivery.py: journaled cells → clients within their credit, ACK, RESUME, SUMMARY;
- worker.py: the supervised scoring worker, which takes its work from the journal.

This module decodes each message, checks it against the limits and the roots, journals jobs and
tiles (the journal is the bounded queue: SUBMIT beyond ``max_jobs`` unfinished jobs and TILE
beyond ``max_pending_tiles`` unscored tiles are answered BUSY with a retry time), and answers.
Every message gets an answer and none can stop the daemon: a fault while handling one is an
INTERNAL error for that message only. Only the socket thread touches the sockets.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import zmq

from cytoedge.runtime import __version__
from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.config import ServiceConfig
from cytoedge.runtime.service.delivery import Delivery
from cytoedge.runtime.service.roots import PathRefused, check_submitted_path
from cytoedge.runtime.service.scoring import ScorerFactory
from cytoedge.runtime.service.transport import Transport
from cytoedge.runtime.service.worker import ScoringWorker

log = logging.getLogger(__name__)

POLL_MS = 100
PURGE_EVERY_S = 3600.0
MAINTAIN_EVERY_S = 5.0  # journal checkpoint and vacuum


class Daemon:
    """Serve ``config.endpoint`` until ``stop()``; ``ready`` is set once bound (``endpoint`` is then the real one)."""

    def __init__(self, config: ServiceConfig, scorer_factory: ScorerFactory):
        self.config = config
        self.scorer_factory = scorer_factory
        self.instance = uuid.uuid4().hex
        self.ready = threading.Event()
        self.endpoint = config.endpoint
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._wake_endpoint = f"inproc://cytoedge-wake-{self.instance}"
        self.worker: ScoringWorker | None = None

    def stop(self) -> None:
        self._stop.set()
        if self.worker is not None:
            self.worker.work.set()

    # ------------------------------------------------------------------ socket thread
    def serve(self) -> None:
        """Bind, resume unfinished jobs, and answer messages until stop(). Cleans up on any exit."""
        cfg = self.config
        self.journal = J.Journal(cfg.journal)
        requeued, crashed = self.journal.requeue_interrupted(cfg.max_stalls)
        purged = self.journal.purge(cfg.retain_s)
        self.journal.maintain()
        unfinished = self.journal.unfinished_jobs()
        log.info("journal opened", extra={"event": "journal", "path": str(cfg.journal), "requeued": requeued,
                                           "crashed": crashed, "purged": purged, "unfinished": len(unfinished)})
        for job_id in crashed:
            log.error("job failed: it stopped the daemon repeatedly", extra={"event": "crashed", "job_id": job_id})
        ctx = zmq.Context()
        transport = None
        self.delivery = Delivery(self.journal, self._send)
        self.worker = ScoringWorker(cfg, self.scorer_factory, ctx, self._wake_endpoint)
        try:
            transport = self.transport = Transport(cfg, ctx, self._wake_endpoint, self.delivery.peer_gone)
            self.endpoint = transport.endpoint
            self.worker.start()
            log.info("listening", extra={"event": "listening", "endpoint": self.endpoint, "curve": cfg.curve_enabled,
                                         "instance": self.instance})
            self.ready.set()
            self._loop(transport)
        finally:
            self._stop.set()
            self.worker.stop()
            if transport is not None:
                transport.close()
            ctx.term()
            self.journal.close()
            self.scorer_factory.close()
            log.info("stopped", extra={"event": "stopped", "instance": self.instance})

    def _loop(self, transport: Transport) -> None:
        last_purge = last_maintain = time.monotonic()
        while not self._stop.is_set():
            messages, woken, any_event = transport.poll(POLL_MS)
            for frames in messages:
                self._on_message(frames)
            for job_id in woken:
                self.delivery.pump(job_id)
            if not any_event:
                self.delivery.pump_all()
            self.worker.ensure_running()
            now = time.monotonic()
            if now - last_maintain > MAINTAIN_EVERY_S:
                self._maintain()
                last_maintain = now
            if now - last_purge > min(PURGE_EVERY_S, self.config.retain_s / 4):
                self.journal.purge(self.config.retain_s)
                last_purge = now

    def _maintain(self) -> None:
        try:
            self.journal.maintain()
        except Exception:  # a busy or full disk must not stop the daemon; the next round tries again
            log.exception("journal maintenance failed")

    def _send(self, peer: bytes, command: str, header: dict, payload: tuple[bytes, ...] = ()) -> bool:
        return self.transport.send(peer, command, header, payload)

    def _error(self, peer: bytes, code: str, message: str, **extra: object) -> None:
        header = {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
        log.info("refused", extra={"event": "error", "code": code, "detail": message[:200]})
        self._send(peer, P.ERROR, header)

    def _on_message(self, frames: list[bytes]) -> None:
        peer, body = frames[0], frames[1:]
        command = job_id = None
        try:
            msg = P.decode(body, "client", self.config.max_header_bytes)
            command, job_id = msg.command, msg.header.get("job_id")
            getattr(self, f"_on_{msg.command.lower()}")(peer, msg)
        except P.ProtocolError as e:
            extra: dict = {"supported_versions": list(P.SUPPORTED_VERSIONS)} if e.code == P.UNSUPPORTED_VERSION else {}
            if e.code == P.BUSY:
                extra["retry_after_s"] = self.config.busy_retry_s
            self._error(peer, e.code, str(e), command=e.command or command, job_id=job_id, **extra)
        except Exception as e:  # a fault while handling one message is that message's answer, never the daemon's end
            log.exception("internal error handling %s", command)
            self._error(peer, P.INTERNAL, f"{command}: {type(e).__name__}: {e}", command=command)

    # --- handlers ---------------------------------------------------------------------------
    def _on_hello(self, peer, msg: P.Message) -> None:
        if P.PROTOCOL_VERSION not in msg.header["versions"]:
            raise P.ProtocolError(P.UNSUPPORTED_VERSION, f"client speaks {msg.header['versions']}; this server speaks "
                                                         f"{list(P.SUPPORTED_VERSIONS)}", P.HELLO)
        cfg = self.config
        self._send(peer, P.HELLO, {
            "version": P.PROTOCOL_VERSION, "server": f"cytoedge {__version__}", "instance": self.instance,
            "capabilities": list(P.CAPABILITIES), "model": self.scorer_factory.identity(),
            "limits": {"max_header_bytes": cfg.max_header_bytes, "max_message_bytes": cfg.max_message_bytes,
                       "max_tile_pixels": cfg.max_tile_pixels, "max_jobs": cfg.max_jobs,
                       "max_pending_tiles": cfg.max_pending_tiles, "window": cfg.window,
                       "max_window": cfg.max_window, "stream_idle_s": cfg.stream_idle_s}})

    def _job_or_error(self, job_id: str, command: str) -> J.Job:
        job = self.journal.job(job_id)
        if job is None:
            raise P.ProtocolError(P.UNKNOWN_JOB, f"{command}: no job {job_id} (never submitted, or purged)", command)
        return job

    def _window(self, requested: int | None) -> int:
        return min(requested or self.config.window, self.config.max_window)

    def _on_submit(self, peer, msg: P.Message) -> None:
        header, source = msg.header, dict(msg.header["source"])
        request = json.dumps(source, sort_keys=True, separators=(",", ":"))  # what a resend must repeat
        existing = self.journal.job_by_request(header["request_id"])
        if existing is not None:
            if (existing.request or request) != request:
                raise P.ProtocolError(P.REQUEST_CONFLICT, f"SUBMIT: request_id {header['request_id']!r} was used for "
                                                          f"job {existing.job_id} with source {existing.request}; "
                                                          "a new request needs a new request_id", P.SUBMIT)
            if existing.source["kind"] != source["kind"]:
                raise P.ProtocolError(P.WRONG_STATE, f"SUBMIT: request_id {header['request_id']!r} was used for "
                                                     "another source", P.SUBMIT)
        else:
            if source["kind"] == "path":
                try:
                    source["path"] = str(check_submitted_path(source["path"], self.config.roots))
                except PathRefused as e:
                    raise P.ProtocolError(P.PATH_REFUSED, f"SUBMIT: {e}", P.SUBMIT) from None
            if self.journal.count_active() >= self.config.max_jobs:
                raise P.ProtocolError(P.BUSY, f"SUBMIT: {self.config.max_jobs} jobs are already unfinished; retry "
                                              f"in {self.config.busy_retry_s:g} s", P.SUBMIT)
        job, duplicate = self.journal.create_job(header["request_id"], source, self._window(header.get("window")),
                                                 request)
        self.delivery.attach(job.job_id, peer, job.acked + 1)
        log.info("job accepted", extra={"event": "accepted", "job_id": job.job_id, "kind": job.kind,
                                        "duplicate": duplicate})
        self._send(peer, P.ACCEPTED, {"what": "job", "job_id": job.job_id, "request_id": job.request_id,
                                      "duplicate": duplicate, "window": job.window})
        self.worker.work.set()
        self.delivery.pump(job.job_id)

    def _on_tile(self, peer, msg: P.Message) -> None:
        header = msg.header
        job = self._job_or_error(header["job_id"], P.TILE)
        if job.kind != "stream" or job.state != J.RECEIVING:
            error = f" ({job.error['message']})" if job.error else ""
            raise P.ProtocolError(P.WRONG_STATE, f"TILE: job {job.job_id} is a {job.kind} job in state {job.state}"
                                                 f"{error}; tiles go to a stream job before its END_OF_SLIDE is "
                                                 "scored", P.TILE)
        if job.tiles_expected is not None and header["tile_index"] >= job.tiles_expected:
            raise P.ProtocolError(P.BAD_TILE, f"TILE: index {header['tile_index']} but END_OF_SLIDE said "
                                              f"{job.tiles_expected} tiles", P.TILE)
        um_per_px = header.get("um_per_px") or job.source.get("um_per_px")
        if um_per_px is None:
            raise P.ProtocolError(P.BAD_HEADER, "TILE: um_per_px is needed (neither the tile nor the job gives it)", P.TILE)
        P.tile_pixels(header, msg.payload[0], self.config.max_tile_pixels)
        height, width, _ = header["shape"]
        refusal = self.scorer_factory.tile_refusal(height, width, float(um_per_px))
        if refusal is not None:
            raise P.ProtocolError(P.TOO_LARGE, f"TILE {header['tile_index']}: {refusal}", P.TILE)
        if self.journal.pending_tiles() >= self.config.max_pending_tiles:
            raise P.ProtocolError(P.BUSY, f"TILE: {self.config.max_pending_tiles} tiles are waiting to be scored; "
                                          f"resend this tile in {self.config.busy_retry_s:g} s", P.TILE)
        added = self.journal.add_tile(job.job_id, header["tile_index"], header, msg.payload[0])
        if not added:  # a resend is activity too: the stream is not abandoned
            self.journal.touch(job.job_id)
        self.delivery.attach(job.job_id, peer)
        self._send(peer, P.ACCEPTED, {"what": "tile", "job_id": job.job_id, "tile_index": header["tile_index"],
                                      "duplicate": not added})
        self.worker.work.set()

    def _on_end_of_slide(self, peer, msg: P.Message) -> None:
        job = self._job_or_error(msg.header["job_id"], P.END_OF_SLIDE)
        if job.kind != "stream":
            raise P.ProtocolError(P.WRONG_STATE, f"END_OF_SLIDE: job {job.job_id} is not a stream job", P.END_OF_SLIDE)
        received, _ = self.journal.tile_counts(job.job_id)
        if job.state == J.RECEIVING:
            if received > msg.header["tiles"]:
                raise P.ProtocolError(P.BAD_TILE, f"END_OF_SLIDE: says {msg.header['tiles']} tiles but {received} "
                                                  "were received", P.END_OF_SLIDE)
            self.journal.set_tiles_expected(job.job_id, msg.header["tiles"])
        self.delivery.attach(job.job_id, peer)
        self.delivery.progress(peer, job.job_id)
        self.worker.work.set()

    def _on_cancel(self, peer, msg: P.Message) -> None:
        job = self._job_or_error(msg.header["job_id"], P.CANCEL)
        if job.state in J.ACTIVE:
            self.journal.request_cancel(job.job_id)
            self.worker.work.set()
        log.info("cancel requested", extra={"event": "cancel", "job_id": job.job_id, "state": job.state})
        self.delivery.progress(peer, job.job_id)

    def _on_status(self, peer, msg: P.Message) -> None:
        if "job_id" in msg.header:
            self._job_or_error(msg.header["job_id"], P.STATUS)
            self.delivery.progress(peer, msg.header["job_id"])
            return
        cfg = self.config
        self._send(peer, P.STATUS, {
            "instance": self.instance, "active_jobs": self.journal.count_active(), "max_jobs": cfg.max_jobs,
            "pending_tiles": self.journal.pending_tiles(), "max_pending_tiles": cfg.max_pending_tiles,
            "uptime_s": round(time.monotonic() - self._started, 3), "workers": [self.worker.health.to_dict()],
            "journal": self.journal.sizes()})

    def _on_ack(self, peer, msg: P.Message) -> None:
        self.delivery.on_ack(peer, msg)

    def _on_resume(self, peer, msg: P.Message) -> None:
        window = self._window(msg.header["window"]) if msg.header.get("window") else None
        self.delivery.on_resume(peer, msg, window)

