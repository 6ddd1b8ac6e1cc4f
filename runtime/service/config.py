"""Daemon configuration: a JSON file (optional) overridden by command-line flags, checked as a whole.

Safety rules live here: CURVE is mandatory for any endpoint that is not loopback or ipc, slide
paths must lie under ``roots``, and every message and tile has a size limit.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.run_log import default_run_log

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5590"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class ConfigError(CytoedgeError):
    """The daemon's or the client's configuration is incomplete or unsafe."""


@dataclass
class ServiceConfig:
    endpoint: str = DEFAULT_ENDPOINT
    roots: list[Path] = field(default_factory=list)  # slide files must lie under one of these
    journal: Path = Path("cytoedge-journal.sqlite3")
    max_jobs: int = 64  # unfinished jobs; SUBMIT beyond this is answered BUSY
    max_pending_tiles: int = 256  # in-band tiles journaled but not scored; TILE beyond this is BUSY
    max_tile_pixels: int = 4096 * 4096
    max_header_bytes: int = 64 * 1024
    window: int = 256  # default CELL credit per job
    max_window: int = 4096
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 5000
    retain_s: float = 7 * 24 * 3600.0  # finished jobs stay resumable this long
    stream_idle_s: float = 300.0  # a stream with no TILE / END_OF_SLIDE this long fails and its tiles are freed
    max_stalls: int = 3  # restarts in a row a job may stop the daemon without a new cell before it fails
    busy_retry_s: float = 1.0  # BUSY's retry_after_s
    curve_secret_key: Path | None = None  # zmq.auth certificate file holding the server's secret key
    curve_allowed_keys: Path | None = None  # folder of client public-key certificates (*.key)
    log_format: str = "text"
    run_log: Path | None = field(default_factory=default_run_log)  # one row per scored slide; None: off
    # Put a DICOM slide's patient, study and specimen identifiers in its SUMMARY (summary.identifiers),
    # and so in the journal; off, no identifier from a header reaches the journal, a message or the log.
    include_identifiers: bool = False

    @property
    def max_message_bytes(self) -> int:
        """Largest frame accepted (ZMQ_MAXMSGSIZE): one tile's pixels; a bigger frame drops the peer."""
        return self.max_tile_pixels * 3 + self.max_header_bytes

    @property
    def curve_enabled(self) -> bool:
        return self.curve_secret_key is not None

    def check(self) -> "ServiceConfig":
        """Refuse an unsafe or inconsistent configuration, naming the setting."""
        scheme = urlsplit(self.endpoint).scheme
        if scheme not in ("tcp", "ipc"):
            raise ConfigError(f"endpoint {self.endpoint!r}: use tcp://HOST:PORT or ipc://PATH")
        if scheme == "tcp" and not is_loopback(self.endpoint) and not self.curve_enabled:
            raise ConfigError(f"endpoint {self.endpoint!r} is not loopback: CURVE is required "
                              "(set curve_secret_key and curve_allowed_keys)")
        if self.curve_enabled != (self.curve_allowed_keys is not None):
            raise ConfigError("curve_secret_key and curve_allowed_keys go together (server key + client allow-list)")
        for name in ("max_jobs", "max_pending_tiles", "max_tile_pixels", "max_header_bytes", "window",
                     "heartbeat_ivl_ms", "heartbeat_timeout_ms", "max_stalls"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("retain_s", "stream_idle_s", "busy_retry_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 0 < self.window <= self.max_window:
            raise ConfigError(f"window {self.window} must be in 1..max_window ({self.max_window})")
        if not isinstance(self.include_identifiers, bool):
            raise ConfigError(f"include_identifiers must be true or false, got {self.include_identifiers!r}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format {self.log_format!r}: choose 'text' or 'json'")
        self.roots = [Path(r).resolve() for r in self.roots]
        return self


def is_loopback(endpoint: str) -> bool:
    host = urlsplit(endpoint).hostname or ""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def load_config(path: Path | None, overrides: dict) -> ServiceConfig:
    """Defaults ← JSON file ``path`` ← non-None ``overrides``; unknown keys are refused."""
    values: dict = {}
    if path is not None:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the configuration ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the configuration must be a JSON object")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ServiceConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown}; known: {sorted(known)}")
    for key in ("journal", "curve_secret_key", "curve_allowed_keys", "run_log"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    if "roots" in values:
        values["roots"] = [Path(r) for r in values["roots"]]
    return ServiceConfig(**values).check()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra={...}`` fields."""

    STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        doc.update({k: v for k, v in record.__dict__.items() if k not in self.STANDARD})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)
