"""The run log: one row per slide scored by ``cytoedge score`` or the ``serve`` daemon, in a local SQLite file.

A lab watches its analyser over time — how often it flags cells, how often it sends a slide to
review, whether the cells drift away from what the model was calibrated on, how fast it runs — and
revalidates it on a schedule; ``cytoedge monitor`` (runtime/monitoring.py) reads this log for that.
A row holds the model's identity, counts, rates, the out-of-domain statistic and the time taken, and
names the slide only by its file name, as results.json already does: no patient identifier, no
DICOM header field, no cell image (docs/monitoring.md).

Writers are short-lived: one connection per row, a log born in WAL mode, write transactions taken
immediately and a busy timeout, so ``score`` runs and the daemon's worker threads can append at once. Writing is never allowed to fail a slide: ``record_slide``
turns any fault into a warning.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from cytoedge.runtime.errors import CytoedgeError

log = logging.getLogger(__name__)

ENV_VAR = "CYTOEDGE_RUN_LOG"
FORMAT = "cytoedge-run-log"
FORMAT_VERSION = 1
BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another one (a score run, a daemon worker) to finish

# (column, SQL type) in row order; run_log_row builds exactly these keys
RUN_COLUMNS = (
    ("time", "TEXT NOT NULL"),  # UTC, ISO 8601 with Z, when the slide was finished
    ("command", "TEXT NOT NULL"),  # score | serve
    ("source_name", "TEXT"),  # the slide's file name only (no folder)
    ("status", "TEXT NOT NULL"),  # ok | error (the error's text is not logged: it may quote a path)
    ("model", "TEXT"),
    ("bundle_sha256", "TEXT"),
    ("cytoedge_version", "TEXT"),
    ("backend", "TEXT"),
    ("estimator", "TEXT"),
    ("white_cells", "INTEGER"),  # cells scored (the denominator of both rates)
    ("abnormal", "INTEGER"),
    ("uncertain", "INTEGER"),
    ("anomalous", "INTEGER"),
    ("escalated", "INTEGER"),  # cells abnormal, uncertain or anomalous (each counted once)
    ("platelets", "INTEGER"),
    ("red_cells", "INTEGER"),  # estimated
    ("triage", "TEXT"),  # routine | review | urgent
    ("abnormal_rate", "REAL"),  # abnormal / white_cells
    ("escalation_rate", "REAL"),  # escalated / white_cells
    ("domain_assessed", "INTEGER"),  # 0/1: the slide had enough assessed cells for the out-of-domain verdict
    ("domain_raised", "INTEGER"),  # 0/1: the slide's out-of-domain alarm
    ("domain_shift", "REAL"),  # the slide's shift (runtime/domain_alarm.py) …
    ("domain_threshold", "REAL"),  # … and its calibrated threshold for that many cells
    ("seconds", "REAL"),  # wall-clock time spent on the slide
)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT,
    {", ".join(f"{name} {kind}" for name, kind in RUN_COLUMNS)});
CREATE TABLE IF NOT EXISTS revalidations (id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL,
    details TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_time ON runs (time);
"""


class RunLogError(CytoedgeError):
    """A run log that is missing, is not a cytoedge run log, or is of a newer format."""


def default_run_log() -> Path:
    """``$CYTOEDGE_RUN_LOG``, else ``$XDG_DATA_HOME/cytoedge/runlog.sqlite`` (``~/.local/share`` by default):
    the instrument's user data folder, which outlives output folders and working directories."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "cytoedge" / "runlog.sqlite"


def resolve_run_log(path: Path | None, disabled: bool) -> Path | None:
    """The run log a command writes to: None when disabled, ``path`` when given, else the default."""
    if disabled:
        return None
    return path if path is not None else default_run_log()


def utc_text(when: datetime) -> str:
    """``when`` as the log writes times (a naive datetime is taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rate(count: int | None, total: int | None) -> float | None:
    return round(count / total, 6) if count is not None and total else None


def run_log_row(entry_or_summary: dict, audit: dict, seconds: float | None, when: datetime,
                command: str = "score") -> dict:
    """The run-log row of one slide (pure): a result document's slide entry (runtime/slide_scoring.py
    ``slide_entry``) or a bare slide summary (runtime/summary.py, as the daemon has it), and the
    scorer's audit block (or the daemon's model identity). Missing parts become NULL."""
    if "summary" in entry_or_summary or "status" in entry_or_summary:
        entry = entry_or_summary
        summary = entry.get("summary") or {}
        status = "error" if entry.get("status") == "error" else "ok"
    else:
        entry, summary, status = {}, entry_or_summary, "ok"
    source = entry.get("source") or summary.get("source")
    counts = summary.get("counts") or {}
    white = counts.get("white_cells")

    def listed(key: str) -> list[dict] | None:
        return summary.get(key) if isinstance(summary.get(key), list) else None

    flagged = [listed(k) for k in ("abnormal_cells", "uncertain_cells", "anomalous_cells")]
    escalated = len({c["id"] for cells in flagged for c in cells}) if all(c is not None for c in flagged) else None
    abnormal, uncertain, anomalous = (len(c) if c is not None else None for c in flagged)
    domain = summary.get("domain_alarm") or {}
    assessed = domain.get("assessed")
    return {
        "time": utc_text(when),
        "command": command,
        "source_name": Path(str(source)).name if source else None,
        "status": status,
        "model": audit.get("model") or audit.get("name"),
        "bundle_sha256": audit.get("bundle_sha256"),
        "cytoedge_version": audit.get("cytoedge_version"),
        "backend": audit.get("backend"),
        "estimator": audit.get("estimator"),
        "white_cells": white,
        "abnormal": abnormal,
        "uncertain": uncertain,
        "anomalous": anomalous,
        "escalated": escalated,
        "platelets": counts.get("platelets"),
        "red_cells": counts.get("red_cells_estimated"),
        "triage": (summary.get("triage") or {}).get("level"),
        "abnormal_rate": _rate(abnormal, white),
        "escalation_rate": _rate(escalated, white),
        "domain_assessed": None if assessed is None else int(bool(assessed)),
        "domain_raised": None if assessed is None else int(bool(domain.get("raised"))),
        "domain_shift": domain.get("shift"),
        "domain_threshold": domain.get("threshold"),
        "seconds": None if seconds is None else round(float(seconds), 4),
    }


def _initialise(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        db.executescript(SCHEMA)
        db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?), ('format_version', ?)",
                   (FORMAT, str(FORMAT_VERSION)))


def _build(path: Path) -> None:
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    try:
        _initialise(db)
    finally:
        db.close()


def _create(path: Path) -> None:
    """Build a new log beside ``path`` and link it into place. Writers that start together on a missing
    file would otherwise race to switch it to WAL, and SQLite answers that race with "database is locked"
    at once, without waiting out the busy timeout. If another writer links first, its file is the log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, as sqlite3 makes it
    try:
        _build(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: the log is made in place
            _build(path)
    finally:
        os.unlink(tmp)


def _connect(path: Path) -> sqlite3.Connection:
    """A write connection to the log at ``path`` (created with its tables if new); RunLogError if the file
    is another program's database."""
    if not path.exists():
        _create(path)
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise RunLogError(f"{path}: an SQLite file that is not a cytoedge run log (tables {sorted(tables)}); "
                              f"choose another file")
        if not tables:  # an empty file someone made for the log
            _initialise(db)
        _check_meta(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _write(path: Path, sql: str, params: list | tuple) -> None:
    """One statement in its own write transaction, taken with BEGIN IMMEDIATE: the write lock is claimed
    (waiting out the busy timeout) before anything is read, so a deferred read can never need upgrading
    while another writer commits, which SQLite would refuse without waiting."""
    db = _connect(Path(path))
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute(sql, params)
        db.commit()
    finally:
        db.close()  # an uncommitted transaction is rolled back here


def _check_meta(db: sqlite3.Connection, path: Path) -> None:
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        raise RunLogError(f"{path}: not a cytoedge run log (its meta table says format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RunLogError(f"{path}: run log format {meta['format_version']} is newer than this cytoedge reads "
                          f"({FORMAT_VERSION}); upgrade cytoedge")


def append_run(path: Path, row: dict) -> None:
    """Append one row (from ``run_log_row``); raises sqlite3.Error, OSError or RunLogError."""
    names = [name for name, _ in RUN_COLUMNS]
    _write(path, f"INSERT INTO runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
           [row.get(n) for n in names])


def record_slide(path: Path | None, entry_or_summary: dict, audit: dict, seconds: float | None,
                 command: str) -> bool:
    """The scoring side's one call: log a finished slide to ``path`` (None: logging is off). Never raises —
    a run log that cannot be written is a warning, and the slide's results stand. True if written."""
    if path is None:
        return False
    try:
        append_run(path, run_log_row(entry_or_summary, audit, seconds, datetime.now(timezone.utc), command))
        return True
    except Exception as e:  # a full disk, a locked or foreign file, a malformed summary: never the slide's fault
        log.warning("run log %s not written: %s: %s", path, type(e).__name__, e)
        return False


def record_revalidation(path: Path, when: datetime, details: dict) -> None:
    """Record a passed revalidation (``cytoedge compare`` against human readers) at ``when``, with JSON-ready
    ``details`` (what was compared, the figures). ``cytoedge monitor`` counts the days since the last one,
    and its control charts take a new baseline after it: the lab has accepted the current level."""
    _write(path, "INSERT INTO revalidations (time, details) VALUES (?, ?)",
           (utc_text(when), json.dumps(details, sort_keys=True)))


def _open_existing(path: Path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise RunLogError(f"{path}: no run log there ({'a folder' if path.exists() else 'no such file'}); "
                          f"score a slide first, or give --run-log / {ENV_VAR}")
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    db.row_factory = sqlite3.Row
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"meta", "runs", "revalidations"} <= tables:
            raise RunLogError(f"{path}: not a cytoedge run log (an SQLite file without its tables)")
        _check_meta(db, path)
    except sqlite3.DatabaseError as e:
        db.close()
        raise RunLogError(f"{path}: not a cytoedge run log ({e})") from None
    except BaseException:
        db.close()
        raise
    return db


def read_runs(path: Path) -> list[dict]:
    """Every slide row, oldest first (RunLogError if ``path`` is not a run log)."""
    db = _open_existing(path)
    try:
        return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY time, id")]
    finally:
        db.close()


def read_revalidations(path: Path) -> list[dict]:
    """Every revalidation event, oldest first, with its details decoded."""
    db = _open_existing(path)
    try:
        return [{"time": r["time"], "details": json.loads(r["details"])}
                for r in db.execute("SELECT * FROM revalidations ORDER BY time, id")]
    finally:
        db.close()
