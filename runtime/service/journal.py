"""The job journal: SQLite in WAL mode, the single source of truth for jobs, tiles and cell results.

A cell is committed here (``synchronous=FULL``) before it is sent, under a per-job sequence
number, so whatever the client has not acknowledged can be resent after a reconnect or a daemon
restart. In-band tiles are committed before they are ACCEPTED and their pixels kept only until
their cells are journaled: the same transaction stores the cells, the stream scorer's checkpoint
(what it needs to go on after a restart without the pixels) and drops the pixels. Freed pages go
back to the file system (incremental vacuum), and the WAL is truncated after checkpoints, so the
file stays as large as the work in flight plus the retained results. Each thread opens its own
Journal.

Longer than most modules (about 390 lines) because the schema and every statement that writes it
belong together: each transaction's atomicity is the delivery guarantee, and splitting them would
spread one invariant over several files.
"""
from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.service import protocol as P

# states a job passes through; the last four are final for scoring
RECEIVING, QUEUED, SCORING = "receiving", "queued", "scoring"
SCORED, DELIVERED, CANCELLED, FAILED = "scored", "delivered", "cancelled", "failed"
FINISHED = (SCORED, DELIVERED, CANCELLED, FAILED)
ACTIVE = (RECEIVING, QUEUED, SCORING)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    ordinal INTEGER NOT NULL,
    cells INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0,
    window INTEGER NOT NULL,
    tiles_expected INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    summary TEXT,
    digest TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tiles (
    ordinal INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    tile_index INTEGER NOT NULL,
    header TEXT NOT NULL,
    pixels BLOB,
    scored INTEGER NOT NULL DEFAULT 0,
    UNIQUE (job_id, tile_index)
);
CREATE INDEX IF NOT EXISTS tiles_pending ON tiles (scored, ordinal);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# columns added since the first journal format, with their declarations: added on open, to a new
# journal as to one written by an earlier cytoedge
ADDED_JOB_COLUMNS = {"request": "TEXT", "checkpoint": "TEXT", "attempt_open": "INTEGER NOT NULL DEFAULT 0",
                     "attempt_cells": "INTEGER NOT NULL DEFAULT 0", "stalls": "INTEGER NOT NULL DEFAULT 0"}
WAL_LIMIT_BYTES = 8 * 1024 * 1024  # the WAL is truncated to this after a checkpoint
VACUUM_FREE_SHARE = 0.25  # give pages back once this share of the file is free


@dataclass
class Job:
    job_id: str
    request_id: str
    kind: str
    source: dict
    state: str
    cells: int
    acked: int
    window: int
    tiles_expected: int | None
    summary: dict | None
    digest: str | None
    error: dict | None
    request: str | None = None  # canonical JSON of what the SUBMIT asked for (request_id conflicts)
    checkpoint: dict | None = None  # a stream scorer's state after its last scored tile

    @property
    def input_name(self) -> str:
        """What the job scores, for messages: the slide path or the stream's name."""
        return str(self.source.get("path") or self.source.get("name") or self.job_id)


def _job(row: sqlite3.Row | None) -> Job | None:
    if row is None:
        return None
    return Job(row["job_id"], row["request_id"], row["kind"], json.loads(row["source"]), row["state"], row["cells"],
               row["acked"], row["window"], row["tiles_expected"],
               json.loads(row["summary"]) if row["summary"] else None, row["digest"],
               json.loads(row["error"]) if row["error"] else None, row["request"],
               json.loads(row["checkpoint"]) if row["checkpoint"] else None)


class Journal:
    """One thread's connection to the journal file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new file (an old one: maintain)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            for name, decl in ADDED_JOB_COLUMNS.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        except (OSError, sqlite3.Error) as e:
            raise CytoedgeError(f"journal {self.path}: cannot open it as an SQLite database ({e})") from None

    def close(self) -> None:
        self.db.close()

    # --- space --------------------------------------------------------------------------------
    def sizes(self) -> dict:
        """File sizes and page counts, for STATUS and the soak benchmark."""
        wal = self.path.with_name(self.path.name + "-wal")
        return {"db_bytes": self.path.stat().st_size if self.path.exists() else 0,
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "free_pages": int(self.db.execute("PRAGMA freelist_count").fetchone()[0]),
                "pages": int(self.db.execute("PRAGMA page_count").fetchone()[0])}

    def maintain(self) -> None:
        """Checkpoint the WAL (then truncated to WAL_LIMIT_BYTES) and give free pages back once they
        are a large share of the file. A journal made before auto_vacuum is converted once (VACUUM)."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.db.execute("PRAGMA freelist_count").fetchone()[0])
        if pages == 0 or free < max(64, VACUUM_FREE_SHARE * pages):
            return
        if int(self.db.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
            self.db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self.db.execute("VACUUM")
        else:
            self.db.executescript("PRAGMA incremental_vacuum;")  # one page per step: executescript steps to the end
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _next_ordinal(self) -> int:
        self.db.execute("INSERT INTO counters VALUES ('job', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")
        return int(self.db.execute("SELECT value FROM counters WHERE name = 'job'").fetchone()[0])

    # --- jobs -------------------------------------------------------------------------------
    def create_job(self, request_id: str, source: dict, window: int, request: str | None = None) -> tuple[Job, bool]:
        """The job for ``request_id``, created if new; ``True`` when it already existed. ``request``
        is the canonical form of what was asked, kept to tell a resend from a conflicting reuse."""
        existing = self.job_by_request(request_id)
        if existing is not None:
            return existing, True
        kind = source["kind"]
        state = RECEIVING if kind == "stream" else QUEUED
        now = time.time()
        job_id = uuid.uuid4().hex
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO jobs (job_id, request_id, kind, source, state, ordinal, window, created, updated, "
                "request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, request_id, kind, json.dumps(source), state, self._next_ordinal(), window, now, now,
                 request))
        return self.job(job_id), False

    def job(self, job_id: str) -> Job | None:
        return _job(self.db.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone())

    def job_by_request(self, request_id: str) -> Job | None:
        return _job(self.db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone())

    def set_scoring(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET state = ?, updated = ? WHERE job_id = ? AND state = ?",
                        (SCORING, time.time(), job_id, QUEUED))

    def set_window(self, job_id: str, window: int) -> None:
        self.db.execute("UPDATE jobs SET window = ? WHERE job_id = ?", (window, job_id))

    def set_tiles_expected(self, job_id: str, tiles: int) -> None:
        self.db.execute("UPDATE jobs SET tiles_expected = ?, updated = ? WHERE job_id = ?", (tiles, time.time(), job_id))

    def record_ack(self, job_id: str, seq: int) -> int:
        """Raise the acknowledged sequence number (never lower it); returns the stored value."""
        self.db.execute("UPDATE jobs SET acked = MAX(acked, MIN(?, cells)) WHERE job_id = ?", (seq, job_id))
        row = self.db.execute("SELECT acked FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return int(row[0]) if row else 0

    def count_active(self) -> int:
        marks = ",".join("?" * len(ACTIVE))
        return int(self.db.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", ACTIVE).fetchone()[0])

    def unfinished_jobs(self) -> list[Job]:
        marks = ",".join("?" * len(ACTIVE))
        rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY ordinal", ACTIVE).fetchall()
        return [_job(r) for r in rows]

    def requeue_interrupted(self, max_stalls: int) -> tuple[int, list[str]]:
        """After a restart: jobs caught mid-scoring go back to the queue (their cells stay), except
        a job whose scoring stopped the daemon ``max_stalls`` times in a row without a new cell: it is
        failed (CRASHED), not retried forever. Returns (requeued, failed job ids)."""
        failed = []
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE jobs SET stalls = CASE WHEN cells = attempt_cells THEN stalls + 1 ELSE 1 END, "
                            "attempt_open = 0 WHERE attempt_open = 1")
            marks = ",".join("?" * len(ACTIVE))
            for row in self.db.execute(f"SELECT job_id, cells, stalls FROM jobs WHERE stalls >= ? AND state IN ({marks})",
                                       (max_stalls, *ACTIVE)).fetchall():
                failed.append(row["job_id"])
                error = {"code": P.FAILED_CRASHED, "message": f"job {row['job_id']}: scoring it stopped the daemon "
                                                       f"{row['stalls']} times in a row without a new cell (after "
                                                       f"cell {row['cells']}); it is not retried"}
                digest = P.records_digest(self.all_records(row["job_id"]))
                self.db.execute("UPDATE jobs SET state = ?, error = ?, digest = ?, checkpoint = NULL, updated = ? "
                                "WHERE job_id = ?", (FAILED, json.dumps(error), digest, time.time(), row["job_id"]))
                self.db.execute("DELETE FROM tiles WHERE job_id = ?", (row["job_id"],))
            requeued = self.db.execute("UPDATE jobs SET state = ? WHERE state = ?", (QUEUED, SCORING)).rowcount
        return requeued, failed

    def begin_attempt(self, job_id: str) -> None:
        """Mark a work item of ``job_id`` as running (a crash leaves the mark for requeue_interrupted)."""
        self.db.execute("UPDATE jobs SET attempt_open = 1, attempt_cells = cells WHERE job_id = ?", (job_id,))

    def end_attempt(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET attempt_open = 0, stalls = 0 WHERE job_id = ?", (job_id,))

    def request_cancel(self, job_id: str) -> None:
        self.db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        row = self.db.execute("SELECT cancel_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def finish(self, job_id: str, state: str, **fields: object) -> bool:
        """Move an active job to a final state (only the worker does this); False if it was not active."""
        cols = {"state": state, "updated": time.time()}
        for key, value in fields.items():
            cols[key] = json.dumps(value) if key in ("summary", "error") and value is not None else value
        assignments = ", ".join(f"{k} = ?" for k in cols)
        marks = ",".join("?" * len(ACTIVE))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ? AND state IN ({marks})",
                                  (*cols.values(), job_id, *ACTIVE))
            if cur.rowcount == 1:  # a finished job is never scored again: its tiles are no longer needed
                self.db.execute("DELETE FROM tiles WHERE job_id = ?", (job_id,))
                self.db.execute("UPDATE jobs SET checkpoint = NULL, attempt_open = 0 WHERE job_id = ?", (job_id,))
        return cur.rowcount == 1

    def mark_delivered(self, job_id: str) -> bool:
        """SCORED → DELIVERED once the client acknowledged every cell."""
        cur = self.db.execute("UPDATE jobs SET state = ?, updated = ? WHERE job_id = ? AND state = ? AND acked >= cells",
                              (DELIVERED, time.time(), job_id, SCORED))
        return cur.rowcount == 1

    def next_work(self, idle_before: float | None = None) -> tuple[str, Job, int | None] | None:
        """The oldest thing to do: ('cancel', job, None) for a cancel request, ('idle', job, None) for a
        stream that has had no message since ``idle_before`` (a time; None: no idle limit) and has
        nothing left to score, ('job', job, None) for a queued path job, ('tile', job, ordinal) for an
        unscored tile, ('end', job, None) for a stream whose tiles are all scored and whose
        END_OF_SLIDE has come."""
        marks = ",".join("?" * len(ACTIVE))
        cancel_row = self.db.execute(f"SELECT * FROM jobs WHERE cancel_requested = 1 AND state IN ({marks}) "
                                     "ORDER BY ordinal LIMIT 1", ACTIVE).fetchone()
        if cancel_row is not None:
            return "cancel", _job(cancel_row), None
        if idle_before is not None:
            idle_row = self.db.execute(
                "SELECT * FROM jobs j WHERE kind = 'stream' AND state = ? AND updated < ? "
                "AND NOT EXISTS (SELECT 1 FROM tiles t WHERE t.job_id = j.job_id AND t.scored = 0) "
                "AND NOT (tiles_expected IS NOT NULL AND "
                "         (SELECT COUNT(*) FROM tiles t WHERE t.job_id = j.job_id) >= tiles_expected) "
                "ORDER BY ordinal LIMIT 1", (RECEIVING, idle_before)).fetchone()
            if idle_row is not None:
                return "idle", _job(idle_row), None
        job_row = self.db.execute("SELECT * FROM jobs WHERE kind = 'path' AND state = ? ORDER BY ordinal LIMIT 1",
                                  (QUEUED,)).fetchone()
        tile_row = self.db.execute(
            "SELECT t.ordinal, t.job_id FROM tiles t JOIN jobs j ON j.job_id = t.job_id "
            "WHERE t.scored = 0 AND j.state IN (?, ?, ?) ORDER BY t.ordinal LIMIT 1", (RECEIVING, QUEUED, SCORING)).fetchone()
        if tile_row is not None:
            tile_job = self.job(tile_row["job_id"])
            if job_row is None or self._job_ordinal(tile_job.job_id) <= job_row["ordinal"]:
                return "tile", tile_job, int(tile_row["ordinal"])
        if job_row is not None:
            return "job", _job(job_row), None
        end_row = self.db.execute(
            "SELECT * FROM jobs j WHERE kind = 'stream' AND state IN (?, ?, ?) AND tiles_expected IS NOT NULL "
            "AND (SELECT COUNT(*) FROM tiles t WHERE t.job_id = j.job_id) >= tiles_expected "
            "AND NOT EXISTS (SELECT 1 FROM tiles t WHERE t.job_id = j.job_id AND t.scored = 0) "
            "ORDER BY ordinal LIMIT 1", (RECEIVING, QUEUED, SCORING)).fetchone()
        return ("end", _job(end_row), None) if end_row is not None else None

    def _job_ordinal(self, job_id: str) -> int:
        return int(self.db.execute("SELECT ordinal FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0])

    # --- cells ------------------------------------------------------------------------------
    def append_cells(self, job_id: str, first_seq: int, records: list[bytes]) -> None:
        """Commit ``records`` as seqs ``first_seq, first_seq+1, ...`` and advance the job's count."""
        if not records:
            return
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO cells (job_id, seq, record) VALUES (?, ?, ?)",
                                [(job_id, first_seq + i, r) for i, r in enumerate(records)])
            self.db.execute("UPDATE jobs SET cells = ?, updated = ? WHERE job_id = ?",
                            (first_seq + len(records) - 1, time.time(), job_id))

    def cells(self, job_id: str, first_seq: int, last_seq: int) -> list[tuple[int, bytes]]:
        rows = self.db.execute("SELECT seq, record FROM cells WHERE job_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                               (job_id, first_seq, last_seq)).fetchall()
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def all_records(self, job_id: str) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.execute("SELECT record FROM cells WHERE job_id = ? ORDER BY seq", (job_id,))]

    # --- tiles ------------------------------------------------------------------------------
    def add_tile(self, job_id: str, tile_index: int, header: dict, pixels: bytes) -> bool:
        """Commit a tile; False when this tile index was already journaled (a resend)."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT INTO tiles (job_id, tile_index, header, pixels) VALUES (?, ?, ?, ?)",
                                (job_id, tile_index, json.dumps(header), pixels))
                self.db.execute("UPDATE jobs SET updated = ? WHERE job_id = ?", (time.time(), job_id))
        except sqlite3.IntegrityError:
            return False
        return True

    def touch(self, job_id: str) -> None:
        """A message for the job arrived: its idle clock starts again."""
        self.db.execute("UPDATE jobs SET updated = ? WHERE job_id = ?", (time.time(), job_id))

    def tile(self, ordinal: int) -> tuple[dict, bytes]:
        row = self.db.execute("SELECT header, pixels FROM tiles WHERE ordinal = ?", (ordinal,)).fetchone()
        if row is None or row[1] is None:
            raise CytoedgeError(f"journal: tile {ordinal} has no pixels (already scored or its job finished)")
        return json.loads(row[0]), bytes(row[1])

    def complete_tile(self, job_id: str, ordinal: int, first_seq: int, records: list[bytes],
                      checkpoint: dict) -> None:
        """One transaction: the tile's cells, the scorer's checkpoint after it, the tile marked scored
        and its pixels dropped (the checkpoint replaces them after a restart)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if records:
                self.db.executemany("INSERT INTO cells (job_id, seq, record) VALUES (?, ?, ?)",
                                    [(job_id, first_seq + i, r) for i, r in enumerate(records)])
                self.db.execute("UPDATE jobs SET cells = ? WHERE job_id = ?", (first_seq + len(records) - 1, job_id))
            self.db.execute("UPDATE jobs SET checkpoint = ? WHERE job_id = ?", (json.dumps(checkpoint), job_id))
            self.db.execute("UPDATE tiles SET scored = 1, pixels = NULL WHERE ordinal = ?", (ordinal,))

    def tile_counts(self, job_id: str) -> tuple[int, int]:
        row = self.db.execute("SELECT COUNT(*), COALESCE(SUM(scored), 0) FROM tiles WHERE job_id = ?", (job_id,)).fetchone()
        return int(row[0]), int(row[1])

    def pending_tiles(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM tiles WHERE scored = 0").fetchone()[0])

    def purge(self, older_than_s: float) -> int:
        """Forget finished jobs (and their cells) last touched more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        marks = ",".join("?" * len(FINISHED))
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            ids = [r[0] for r in self.db.execute(
                f"SELECT job_id FROM jobs WHERE state IN ({marks}) AND updated < ?", (*FINISHED, cutoff))]
            for job_id in ids:
                self.db.execute("DELETE FROM cells WHERE job_id = ?", (job_id,))
                self.db.execute("DELETE FROM tiles WHERE job_id = ?", (job_id,))
                self.db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))
        return len(ids)
