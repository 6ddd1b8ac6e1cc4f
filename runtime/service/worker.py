"""The supervised scoring worker: takes work from the journal, scores it, journals every record.

The journal is the queue. Each work item (a path job, a tile, a stream's end, a cancel, an idle
stream) runs under an *attempt* mark in the journal, so a restart can tell a job that stops the
daemon from one that was merely interrupted. Whatever a scorer raises fails that job — with an
error that names the job, its input and the cause, and the traceback in the log — and the worker
goes on with the next item. The socket thread supervises the thread itself: ``ensure_running``
restarts it if it ever ends, and ``health`` is what STATUS reports. A slide scored to its end is
appended to the run log (runtime/run_log.py, the ``run_log`` setting) once its final state is
journaled, so a job is logged once even if the daemon stops around it.

Longer than most modules (about 370 lines) because each kind of work item's attempt, scoring and
journaling must follow the same failure rules, which read best side by side.
"""
from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import zmq

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.run_log import record_slide
from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P
from cytoedge.runtime.service.config import ServiceConfig
from cytoedge.runtime.service.roots import RootGuard
from cytoedge.runtime.service.scoring import JobScorer, ScorerFactory

log = logging.getLogger(__name__)

COMMIT_MAX = 1024  # most cells per journal commit (one fsync); fewer whenever the scorer pauses
RESTART_PAUSE_S = 1.0  # between a worker's death and its restart (a fault that repeats does not spin)


class NondeterministicScorer(CytoedgeError):
    """Scoring a job again after a restart produced a record that differs from the journaled one."""


@dataclass
class WorkerHealth:
    """What STATUS says about a worker (written by the worker, read by the socket thread)."""

    name: str
    alive: bool = False
    job_id: str | None = None
    input: str | None = None
    busy_since: float | None = None
    restarts: int = 0
    jobs_failed: int = 0
    last_error: str | None = None

    def to_dict(self) -> dict:
        busy = round(time.monotonic() - self.busy_since, 3) if self.busy_since is not None else None
        return {"name": self.name, "alive": self.alive, "job_id": self.job_id, "input": self.input, "busy_s": busy,
                "restarts": self.restarts, "jobs_failed": self.jobs_failed, "last_error": self.last_error}


class ScoringWorker:
    """One scoring thread over the journal; wakes the socket thread (``wake_endpoint``, PULL) with
    the job id whenever it has committed something to deliver."""

    def __init__(self, config: ServiceConfig, factory: ScorerFactory, ctx: zmq.Context, wake_endpoint: str,
                 name: str = "cytoedge-scoring"):
        self.config, self.factory, self.ctx, self.wake_endpoint = config, factory, ctx, wake_endpoint
        self.health = WorkerHealth(name)
        self.work = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.time()
        self._died_at: float | None = None

    # --- supervision (socket thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.health.name, daemon=True)
        self.health.alive = True
        self._thread.start()

    def ensure_running(self) -> None:
        """Restart the thread if it ended while the daemon runs (after RESTART_PAUSE_S)."""
        if self._stop.is_set() or self._thread is None or self._thread.is_alive():
            return
        now = time.monotonic()
        if self._died_at is None:
            self._died_at = now
            log.error("scoring worker stopped; restarting it", extra={"event": "worker_died",
                                                                       "job_id": self.health.job_id})
        if now - self._died_at >= RESTART_PAUSE_S:
            self._died_at = None
            self.health.restarts += 1
            self.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.work.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    # --- the thread -----------------------------------------------------------------------------
    def _main(self) -> None:
        wake = self.ctx.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.setsockopt(zmq.SNDHWM, 10_000)
        wake.connect(self.wake_endpoint)
        journal = None
        try:
            journal = J.Journal(self.config.journal)
            notify = lambda job_id: _notify(wake, job_id)  # noqa: E731
            if self.health.restarts:  # the item the thread died on counts as a crash, as after a daemon restart
                for job_id in journal.requeue_interrupted(self.config.max_stalls)[1]:
                    log.error("job failed: it stopped the scoring worker repeatedly",
                              extra={"event": "crashed", "job_id": job_id})
                    notify(job_id)
            items = _Items(journal, self.factory, self.config, notify, self.health)
            while not self._stop.is_set():
                self.work.clear()
                try:
                    did_work = items.step(self._stop, self._idle_before())
                except sqlite3.Error as e:  # e.g. disk full or locked: keep the worker alive, try again shortly
                    log.exception("journal error in the scoring worker")
                    self.health.last_error = f"journal: {e}"
                    did_work = False
                if not did_work:
                    self.work.wait(timeout=0.5)
        except BaseException as e:  # the thread ends here and the supervisor restarts it; say why
            self.health.last_error = f"worker stopped: {type(e).__name__}: {e}"
            log.exception("scoring worker stopped")
        finally:
            self.health.alive = False
            wake.close(linger=0)
            if journal is not None:
                journal.close()

    def _idle_before(self) -> float | None:
        """Streams untouched since this time are abandoned; none are before the daemon has run that long
        (a client may still be reconnecting after a restart)."""
        cutoff = time.time() - self.config.stream_idle_s
        return cutoff if cutoff > self._started else None


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
        except Exception as e:  # handed to the worker, which fails the job
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

    def __init__(self, job: J.Job, scorer: JobScorer, emitted: int = 0):
        self.job_id, self.scorer, self.emitted, self.known = job.job_id, scorer, emitted, job.cells
        self.pending: list[bytes] = []


class _Items:
    """Does one work item at a time; every record is committed before the socket thread is woken."""

    def __init__(self, journal: J.Journal, factory: ScorerFactory, config: ServiceConfig,
                 notify: Callable[[str], None], health: WorkerHealth):
        self.journal, self.factory, self.config, self.notify, self.health = journal, factory, config, notify, health
        self.streams: dict[str, _JobRun] = {}
        self._busy_s: dict[str, float] = {}  # per unfinished job, seconds its earlier work items took
        self._item_started, self._finished = time.monotonic(), None  # this work item's start; the job it finished
        self._identity: dict | None = None

    def step(self, stop: threading.Event, idle_before: float | None) -> bool:
        """Do one piece of work; False when there was none."""
        work = self.journal.next_work(idle_before)
        if work is None:
            return False
        kind, job, ordinal = work
        what = job.input_name if kind != "tile" else f"{job.input_name} tile #{ordinal}"
        self._item_started, self._finished = time.monotonic(), None
        self.health.job_id, self.health.input, self.health.busy_since = job.job_id, what, self._item_started
        self.journal.begin_attempt(job.job_id)
        try:
            if kind == "cancel":
                self._finish(job.job_id, J.CANCELLED)
            elif kind == "idle":
                self._fail(job, P.FAILED_STREAM_IDLE, f"stream {job.input_name!r} sent no TILE or END_OF_SLIDE for "
                                                f"{self.config.stream_idle_s:g} s (stream_idle_s); its tiles were freed")
            elif kind == "job":
                self._score_path_job(job, stop)
            elif kind == "tile":
                self._score_tile(job, ordinal)
            else:
                run = self._stream_run(job)
                self._finish(job.job_id, J.SCORED, summary=run.scorer.summary())
        except CytoedgeError as e:  # a bad input, said so by the scorer
            log.warning("job failed", extra={"event": "failed", "job_id": job.job_id, "detail": str(e)})
            self._fail(job, type(e).__name__, str(e), what)
        except Exception as e:  # any fault while scoring fails this job, never the worker
            log.exception("job failed", extra={"event": "failed", "job_id": job.job_id, "input": what})
            self._fail(job, P.FAILED_SCORING, f"scoring failed: {type(e).__name__}: {e}", what)
        finally:
            self.health.job_id = self.health.input = self.health.busy_since = None
            if self._finished != job.job_id:
                self._busy_s[job.job_id] = self._busy_s.get(job.job_id, 0.0) + time.monotonic() - self._item_started
        self.journal.end_attempt(job.job_id)
        return True

    def _fail(self, job: J.Job, code: str, message: str, what: str | None = None) -> None:
        what = what or job.input_name
        text = message if what in message else f"{what}: {message}"
        self.health.jobs_failed += 1
        self.health.last_error = f"job {job.job_id}: {text}"[:500]
        self._finish(job.job_id, J.FAILED, error={"code": code, "message": text, "job_id": job.job_id, "input": what})

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
        seconds = self._busy_s.pop(job_id, 0.0) + time.monotonic() - self._item_started
        self._finished = job_id
        if self.journal.finish(job_id, state, summary=summary, error=error, digest=digest):
            log.info("job finished", extra={"event": state, "job_id": job_id})
            if state == J.SCORED and summary is not None:
                record_slide(self.config.run_log, summary, self._model_identity(), seconds, "serve")
        self.notify(job_id)

    def _model_identity(self) -> dict:
        """The factory's model identity (HELLO's), asked once: the run log's model columns."""
        if self._identity is None:
            try:
                self._identity = self.factory.identity()
            except Exception as e:  # a scorer that cannot say what it is still scores; its rows lack the model
                log.warning("run log: the scorer's identity is unavailable: %s: %s", type(e).__name__, e)
                return {}
        return self._identity

    def _score_path_job(self, job: J.Job, stop: threading.Event) -> None:
        self.journal.set_scoring(job.job_id)
        self.notify(job.job_id)
        run = _JobRun(job, self.factory.new_job())
        guard = RootGuard(self.config.roots)
        feed = _RecordFeed(run.scorer.score_path(Path(job.source["path"]), job.source.get("um_per_px"), guard.open))
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
        """This stream's run; after a restart, its scorer restored from the journaled checkpoint and records."""
        run = self.streams.get(job.job_id)
        if run is None:
            scorer = self.factory.new_job()
            if job.checkpoint is not None:
                scorer.restore(job.checkpoint, [json.loads(r) for r in self.journal.all_records(job.job_id)])
            run = self.streams[job.job_id] = _JobRun(job, scorer, emitted=job.cells)
        return run

    def _score_tile(self, job: J.Job, ordinal: int) -> None:
        run = self._stream_run(job)
        header, pixels = self.journal.tile(ordinal)
        h, w, c = header["shape"]
        rgb = np.frombuffer(pixels, dtype=P.TILE_DTYPES[header["dtype"]]).reshape(h, w, c)
        um_per_px = header.get("um_per_px") or job.source["um_per_px"]
        records = [P.encode_record(r) for r in run.scorer.score_tile(rgb, tuple(header["origin_xy"]), float(um_per_px))]
        self.journal.complete_tile(job.job_id, ordinal, run.emitted + 1, records, run.scorer.checkpoint())
        run.emitted += len(records)
        if records:
            self.notify(job.job_id)
