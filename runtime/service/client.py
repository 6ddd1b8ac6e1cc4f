"""Reference client of the scanner link (``cytoedge.runtime.service.client``), in the zguide style:
context → DEALER socket → security (CURVE keys) → connect; poll with timeouts; linger 0.

Delivery is exactly-once from the application's point of view: the server sends every cell at
least once (journaled, resent after RESUME) and this client drops any sequence number it has
already handed out, acknowledges what it handed out, and checks the SUMMARY digest over the record
bytes. An application that must survive its own restart stores ``(job_id, last seq)`` and passes
it back as ``last_acked``.

Longer than most modules (about 370 lines): it is the one file a scanner vendor reads to integrate,
so the socket set-up, each request and the delivery state machine stay together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import zmq
import zmq.auth

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.service import protocol as P

log = logging.getLogger(__name__)

POLL_MS = 100
ACK_EVERY = 32  # cells handed out between ACKs (the server's window is larger, so it never stalls)
MAX_REPLY_HEADER = 16 * 1024 * 1024


class ServiceError(CytoedgeError):
    """The server answered ERROR, or did not answer in time (code TIMEOUT)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CurveKeys:
    """Keys a CURVE client needs: the server's public key and the client's own key pair (Z85)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: str | Path, client_secret_file: str | Path) -> "CurveKeys":
        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if client_secret is None:
            raise CytoedgeError(f"{client_secret_file}: holds no secret key (use the .key_secret file)")
        return cls(server_public, client_public, client_secret)


@dataclass
class JobEvent:
    """What ``events()`` yields: a cell (seq, record, raw bytes), a progress report or the summary."""

    kind: str  # "cell" | "progress" | "summary"
    job_id: str
    header: dict
    seq: int | None = None
    record: dict | None = None
    raw: bytes | None = None
    digest_ok: bool | None = None  # summary only: None when this client did not see every cell


@dataclass
class _Track:
    acked: int
    next_seq: int
    hasher: "hashlib._Hash | None"
    done: bool = False
    duplicates: int = 0
    progress_mark: tuple | None = None  # the last PROGRESS's (state, cells, tiles received, tiles scored)


class ScannerLinkClient:
    """One DEALER connection to ``cytoedge serve``. Not thread-safe: use one client per thread."""

    def __init__(self, endpoint: str, curve: CurveKeys | None = None, timeout_s: float = 60.0,
                 resume_after_s: float = 2.0, heartbeat_ivl_ms: int = 1000, heartbeat_timeout_ms: int = 5000):
        self.endpoint, self.timeout_s, self.resume_after_s = endpoint, timeout_s, resume_after_s
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        P.apply_socket_options(self.sock, heartbeat_ivl_ms, heartbeat_timeout_ms)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if curve is not None:  # client keys and the expected server key, before connect()
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public)
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.client_public)
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, curve.client_secret)
        self.sock.connect(endpoint)
        self._inbox: deque[P.Message] = deque()
        self._tracks: dict[str, _Track] = {}
        self._parked: list[P.Message] = []
        self.server: dict | None = None

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()

    def __enter__(self) -> "ScannerLinkClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------
    def send(self, command: str, header: dict, payload: tuple = ()) -> None:
        self.sock.send_multipart(P.encode(command, header, payload), copy=len(payload) == 0)

    def recv(self, timeout_ms: int) -> P.Message | None:
        """One decoded message from the server, or None after ``timeout_ms``."""
        if not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return P.decode(self.sock.recv_multipart(), "server", MAX_REPLY_HEADER)

    def _request(self, command: str, header: dict, replies: tuple[str, ...], payload: tuple = (),
                 timeout_s: float | None = None) -> P.Message:
        """Send one request and wait for its reply; results for other jobs that arrive meanwhile are kept.
        Every request is idempotent (SUBMIT by request_id, TILE by index), so one that goes unanswered
        for ``resume_after_s`` (lost with a dropped connection or a daemon restart) is sent again."""
        self.send(command, header, payload)
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        resend_at = time.monotonic() + self.resume_after_s
        while time.monotonic() < deadline:
            msg = self.recv(POLL_MS)
            if msg is None:
                if time.monotonic() > resend_at:
                    self.send(command, header, payload)
                    resend_at = time.monotonic() + self.resume_after_s
                continue
            if msg.command == P.ERROR and msg.header.get("command") in (command, None):
                raise ServiceError(msg.header["code"], msg.header["message"], msg.header.get("retry_after_s"))
            if msg.command in replies and self._answers(msg, header):
                return msg
            self._inbox.append(msg)
        raise ServiceError("TIMEOUT", f"no reply to {command} from {self.endpoint} within {timeout_s:g} s"
                                      + (" (is `cytoedge serve` running there?)" if command == P.HELLO else ""))

    @staticmethod
    def _answers(msg: P.Message, request: dict) -> bool:
        if msg.command == P.ACCEPTED and "tile_index" in request:
            return msg.header.get("tile_index") == request["tile_index"] and msg.header["job_id"] == request["job_id"]
        if msg.command == P.PROGRESS and "job_id" in request:
            return msg.header["job_id"] == request["job_id"]
        return True

    def _retrying(self, command: str, header: dict, replies: tuple[str, ...], payload: tuple = ()) -> P.Message:
        """``_request`` that waits and retries while the server answers BUSY (its queue is full), as
        long as the server's ``retry_after_s`` says (backing off from 50 ms where it says nothing)."""
        deadline, pause = time.monotonic() + self.timeout_s, 0.05
        while True:
            try:
                return self._request(command, header, replies, payload)
            except ServiceError as e:
                if e.code != P.BUSY:
                    raise
                wait = e.retry_after_s if e.retry_after_s is not None else pause
                if time.monotonic() + wait > deadline:
                    raise
            time.sleep(wait)
            pause = min(pause * 2, 1.0)

    # --- requests -----------------------------------------------------------------------------
    def hello(self, client_name: str = "cytoedge.runtime.service.client", timeout_s: float | None = None) -> dict:
        """Negotiate the version; returns the server's HELLO (capabilities, model identity, limits).
        ``timeout_s`` (default: the client's) bounds the wait: a dead endpoint is ServiceError TIMEOUT."""
        self.server = self._request(P.HELLO, {"versions": list(P.SUPPORTED_VERSIONS), "client": client_name},
                                    (P.HELLO,), timeout_s=timeout_s).header
        return self.server

    def submit_path(self, path: str | Path, um_per_px: float | None = None, request_id: str | None = None,
                    window: int | None = None) -> str:
        """Submit a slide file (it must lie under the server's roots); returns the job id."""
        source: dict = {"kind": "path", "path": str(Path(path).resolve())}
        if um_per_px is not None:
            source["um_per_px"] = um_per_px
        return self._submit(source, request_id, window)

    def open_stream(self, name: str, um_per_px: float, request_id: str | None = None, window: int | None = None) -> str:
        """Start a job whose tiles are sent in-band with ``send_tile``; returns the job id."""
        return self._submit({"kind": "stream", "name": name, "um_per_px": um_per_px}, request_id, window)

    def _submit(self, source: dict, request_id: str | None, window: int | None) -> str:
        header = {"request_id": request_id or uuid.uuid4().hex, "source": source}
        if window is not None:
            header["window"] = window
        return self._retrying(P.SUBMIT, header, (P.ACCEPTED,)).header["job_id"]

    def send_tile(self, job_id: str, tile_index: int, rgb: np.ndarray, origin_xy: tuple[int, int],
                  um_per_px: float | None = None) -> bool:
        """Send one RGB uint8 tile and wait until it is journaled; True if the server already had it."""
        rgb = np.ascontiguousarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise CytoedgeError(f"tile {tile_index}: expected an [H, W, 3] uint8 array, got {rgb.dtype} {rgb.shape}")
        header = {"job_id": job_id, "tile_index": int(tile_index), "shape": list(rgb.shape), "dtype": "uint8",
                  "origin_xy": [int(origin_xy[0]), int(origin_xy[1])]}
        if um_per_px is not None:
            header["um_per_px"] = float(um_per_px)
        return self._retrying(P.TILE, header, (P.ACCEPTED,), (memoryview(rgb).cast("B"),)).header["duplicate"]

    def end_of_slide(self, job_id: str, tiles: int) -> dict:
        return self._request(P.END_OF_SLIDE, {"job_id": job_id, "tiles": int(tiles)}, (P.PROGRESS,)).header

    def cancel(self, job_id: str) -> dict:
        return self._request(P.CANCEL, {"job_id": job_id}, (P.PROGRESS,)).header

    def status(self, job_id: str | None = None) -> dict:
        if job_id is None:
            return self._request(P.STATUS, {}, (P.STATUS,)).header
        return self._request(P.STATUS, {"job_id": job_id}, (P.PROGRESS,)).header

    # --- results ------------------------------------------------------------------------------
    def _tracks_for(self, job_ids: list[str], last_acked: dict[str, int]) -> dict[str, _Track]:
        """Delivery state per job, kept on the client so ``ready()`` and ``events()`` can be mixed;
        a ``last_acked`` entry (the application's stored progress) starts a job's state afresh."""
        self._inbox.extend(self._parked)
        self._parked.clear()
        for job_id in job_ids:
            if job_id in last_acked or job_id not in self._tracks:
                acked = last_acked.get(job_id, 0)
                self._tracks[job_id] = _Track(acked, acked + 1, hashlib.sha256() if acked == 0 else None)
        return {j: self._tracks[j] for j in job_ids}

    def ready(self, job_ids: list[str], progress: bool = False) -> list[JobEvent]:
        """Whatever has arrived for ``job_ids`` by now, without waiting (for a scanner that sends
        tiles and picks up results in the same loop); acknowledges what it returns."""
        tracks = self._tracks_for(job_ids, {})
        events = []
        while True:
            msg = self._inbox.popleft() if self._inbox else self.recv(0)
            if msg is None:
                break
            event = self._handle(msg, tracks, progress)
            if event is not None:
                events.append(event)
        self._ack_all(tracks)
        return events

    def events(self, job_ids: list[str], last_acked: dict[str, int] | None = None, progress: bool = False,
               attach: bool = False) -> Iterator[JobEvent]:
        """Cells (each sequence number exactly once, in order), then a summary, for every job in
        ``job_ids``; progress reports too if asked. RESUMEs after ``resume_after_s`` of silence
        (reconnect or daemon restart); raises ServiceError(TIMEOUT) after ``timeout_s`` of it.
        ``attach``: RESUME every job at once (jobs this connection did not submit)."""
        tracks = self._tracks_for(job_ids, last_acked or {})
        for job_id, track in tracks.items():
            if (track.acked or attach) and not track.done:
                self.send(P.RESUME, {"job_id": job_id, "last_acked_seq": track.next_seq - 1})
        progressed = last_resume = time.monotonic()
        while not all(t.done for t in tracks.values()):
            msg = self._inbox.popleft() if self._inbox else self.recv(0)
            if msg is None:  # the end of a burst: acknowledge it before waiting, so credit never stalls
                self._ack_all(tracks)
                msg = self.recv(POLL_MS)
            now = time.monotonic()
            if now - progressed > self.timeout_s:  # keep-alives (PROGRESS with nothing new) do not count
                raise ServiceError("TIMEOUT", f"no progress from {self.endpoint} for {self.timeout_s:g} s "
                                              "(no cell scored, no tile scored, no state change)")
            if msg is None:
                self._ack_all(tracks)
                if now - last_resume > self.resume_after_s:
                    for job_id, track in tracks.items():
                        if not track.done:
                            self.send(P.RESUME, {"job_id": job_id, "last_acked_seq": track.next_seq - 1})
                    last_resume = now
                continue
            last_resume = now
            if self._is_progress(msg, tracks):
                progressed = now
            event = self._handle(msg, tracks, progress)
            if event is not None:
                yield event

    @staticmethod
    def _is_progress(msg: P.Message, tracks: dict[str, _Track]) -> bool:
        """Whether ``msg`` shows work done for one of ``tracks``: a new cell, a summary, or a PROGRESS
        whose state, cells or scored tiles changed since the last one."""
        track = tracks.get(msg.header.get("job_id"))
        if track is None:
            return False
        if msg.command == P.CELL:
            return msg.header["seq"] >= track.next_seq
        if msg.command == P.PROGRESS:
            h = msg.header
            mark = (h["state"], h["cells"], h.get("tiles_received"), h.get("tiles_scored"))
            changed, track.progress_mark = mark != track.progress_mark, mark
            return changed
        return msg.command in (P.SUMMARY, P.ERROR)

    def _handle(self, msg: P.Message, tracks: dict[str, _Track], progress: bool) -> JobEvent | None:
        """Apply one message to the delivery state; the event to hand to the application, if any."""
        job_id = msg.header.get("job_id")
        track = tracks.get(job_id)
        if track is None:
            if job_id is not None and msg.command in (P.CELL, P.SUMMARY, P.PROGRESS):
                self._parked.append(msg)  # another job's, not asked for in this call: kept for the next
            return None
        if msg.command == P.ERROR:
            raise ServiceError(msg.header["code"], msg.header["message"])
        if track.done:
            return None
        if msg.command == P.CELL:
            event = self._on_cell(msg, job_id, track)
            if track.next_seq - 1 - track.acked >= ACK_EVERY:
                self._ack(job_id, track)
            return event
        if msg.command == P.SUMMARY:
            if msg.header["cells"] != track.next_seq - 1:  # cells still missing: ask again from the gap
                self.send(P.RESUME, {"job_id": job_id, "last_acked_seq": track.next_seq - 1})
                return None
            self._ack(job_id, track)
            track.done = True
            ok = None if track.hasher is None else "sha256:" + track.hasher.hexdigest() == msg.header["digest"]
            if ok is False:
                raise ServiceError("DIGEST", f"job {job_id}: the cells received do not match the SUMMARY digest")
            return JobEvent("summary", job_id, msg.header, digest_ok=ok)
        if msg.command == P.PROGRESS and progress:
            return JobEvent("progress", job_id, msg.header)
        return None

    def _on_cell(self, msg: P.Message, job_id: str, track: _Track) -> JobEvent | None:
        seq = msg.header["seq"]
        if seq < track.next_seq:
            track.duplicates += 1
            return None
        if seq > track.next_seq:  # a gap (messages lost with a dropped connection): ask for the rest
            self.send(P.RESUME, {"job_id": job_id, "last_acked_seq": track.next_seq - 1})
            return None
        raw = bytes(msg.payload[0])
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ServiceError(P.BAD_JSON, f"job {job_id} cell {seq}: record is not JSON ({e})") from None
        if track.hasher is not None:
            track.hasher.update(raw)
            track.hasher.update(b"\n")
        track.next_seq += 1
        return JobEvent("cell", job_id, msg.header, seq, record, raw)

    def _ack(self, job_id: str, track: _Track) -> None:
        if track.next_seq - 1 > track.acked:
            track.acked = track.next_seq - 1
            self.send(P.ACK, {"job_id": job_id, "seq": track.acked})

    def _ack_all(self, tracks: dict[str, _Track]) -> None:
        for job_id, track in tracks.items():
            if not track.done:
                self._ack(job_id, track)

    def wait_result(self, job_id: str) -> tuple[list[dict], dict]:
        """All cell records of a job, in sequence order, and its SUMMARY header."""
        records, summary = [], {}
        for event in self.events([job_id]):
            if event.kind == "cell":
                records.append(event.record)
            else:
                summary = event.header
        return records, summary
