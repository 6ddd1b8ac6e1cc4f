"""Scanner-link protocol v1: command names, the frame codec and header validation.

Every message is a ZeroMQ multipart message ``[version, command, header, payload...]``:
``version`` is the ASCII protocol version (``b"1"``), ``command`` an ASCII name from the tables
below, ``header`` a UTF-8 JSON object checked against ``schemas/<direction>.<COMMAND>.json``,
and payload frames are raw bytes (tile pixels, cell records) — never pickle. The ROUTER side sees
the peer's routing id in front. See docs/protocol.md for the contract vendors implement.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

import numpy as np
import zmq
from jsonschema import Draft202012Validator

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.json_schema import packaged_validator

PROTOCOL_VERSION = 1
VERSION_FRAME = str(PROTOCOL_VERSION).encode("ascii")
SUPPORTED_VERSIONS = (PROTOCOL_VERSION,)

# client → server
HELLO = "HELLO"
SUBMIT = "SUBMIT"
TILE = "TILE"
END_OF_SLIDE = "END_OF_SLIDE"
CANCEL = "CANCEL"
STATUS = "STATUS"
ACK = "ACK"
RESUME = "RESUME"
CLIENT_COMMANDS = (HELLO, SUBMIT, TILE, END_OF_SLIDE, CANCEL, STATUS, ACK, RESUME)

# server → client (HELLO and STATUS are also replies)
ACCEPTED = "ACCEPTED"
CELL = "CELL"
PROGRESS = "PROGRESS"
SUMMARY = "SUMMARY"
ERROR = "ERROR"
SERVER_COMMANDS = (HELLO, ACCEPTED, CELL, PROGRESS, SUMMARY, STATUS, ERROR)

# payload frames each command carries (after the header)
CLIENT_PAYLOAD_FRAMES = {TILE: 1}
SERVER_PAYLOAD_FRAMES = {CELL: 1}

# ERROR codes
BAD_FRAMES = "BAD_FRAMES"
UNSUPPORTED_VERSION = "UNSUPPORTED_VERSION"
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
BAD_JSON = "BAD_JSON"
BAD_HEADER = "BAD_HEADER"
TOO_LARGE = "TOO_LARGE"
BAD_TILE = "BAD_TILE"
BUSY = "BUSY"
PATH_REFUSED = "PATH_REFUSED"
UNKNOWN_JOB = "UNKNOWN_JOB"
WRONG_STATE = "WRONG_STATE"
REQUEST_CONFLICT = "REQUEST_CONFLICT"
INTERNAL = "INTERNAL"

# codes a failed job's SUMMARY.error carries (besides the name of a refusal the scorer raised,
# e.g. InputImageError); they are not ERROR codes
FAILED_SCORING = "JOB_FAILED"  # the scorer raised while scoring the job's input
FAILED_STREAM_IDLE = "STREAM_IDLE"  # a stream sent no TILE / END_OF_SLIDE within the idle limit
FAILED_CRASHED = "CRASHED"  # scoring the job stopped the daemon repeatedly without progress
JOB_ERROR_CODES = (FAILED_SCORING, FAILED_STREAM_IDLE, FAILED_CRASHED)

CAPABILITIES = ("submit-path", "stream-tiles", "resume", "credit-ack", "summary-digest", "worker-health",
                "stream-idle-limit", "request-conflict", "retry-after")
TILE_DTYPES = {"uint8": np.uint8}


class ProtocolError(CytoedgeError):
    """A message that breaks the protocol; ``code`` is the ERROR code the peer is answered with."""

    def __init__(self, code: str, message: str, command: str | None = None):
        super().__init__(message)
        self.code = code
        self.command = command


def apply_socket_options(sock: zmq.Socket, heartbeat_ivl_ms: int, heartbeat_timeout_ms: int) -> None:
    """Options both sides set before connecting: no lingering on close, ZMTP heartbeats for dead peers."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, heartbeat_timeout_ms)


@dataclass
class Message:
    """A decoded message: command, validated header and raw payload frames."""

    command: str
    header: dict
    payload: list[bytes] = field(default_factory=list)


@lru_cache(maxsize=None)
def validator(direction: str, command: str) -> Draft202012Validator:
    """The compiled JSON Schema of ``direction`` ('client' | 'server') ``command`` (package data)."""
    return packaged_validator("cytoedge.runtime.service", f"schemas/{direction}.{command}.json")


def validate_header(direction: str, command: str, header: object) -> None:
    """Raise ProtocolError(BAD_HEADER) naming the first offending field of ``header``."""
    error = next(iter(validator(direction, command).iter_errors(header)), None)
    if error is not None:
        where = error.json_path if error.json_path != "$" else "header"
        raise ProtocolError(BAD_HEADER, f"{command}: {where}: {error.message[:300]}", command)


def encode(command: str, header: dict, payload: Iterable[bytes | memoryview] = ()) -> list[bytes | memoryview]:
    """Frames of one message (without a routing id)."""
    body = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return [VERSION_FRAME, command.encode("ascii"), body, *payload]


def decode(frames: list[bytes], direction: str, max_header_bytes: int) -> Message:
    """Check and decode ``frames`` sent by ``direction``; ProtocolError says what was wrong."""
    if len(frames) < 3:
        raise ProtocolError(BAD_FRAMES, f"{len(frames)} frame(s); a message is [version, command, header, payload...]")
    version, raw_command, body = frames[0], frames[1], frames[2]
    if version != VERSION_FRAME:
        shown = version[:16].decode("ascii", "replace")
        raise ProtocolError(UNSUPPORTED_VERSION, f"protocol version {shown!r} is not supported; this side speaks "
                                                 f"{list(SUPPORTED_VERSIONS)}")
    commands = CLIENT_COMMANDS if direction == "client" else SERVER_COMMANDS
    command = raw_command.decode("ascii", "replace")
    if command not in commands:
        raise ProtocolError(UNKNOWN_COMMAND, f"unknown command {command[:32]!r}; expected one of {list(commands)}")
    if len(body) > max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"{command}: header is {len(body)} bytes; the limit is {max_header_bytes}", command)
    header = parse_header(bytes(body), command)
    validate_header(direction, command, header)
    expected = (CLIENT_PAYLOAD_FRAMES if direction == "client" else SERVER_PAYLOAD_FRAMES).get(command, 0)
    if len(frames) - 3 != expected:
        raise ProtocolError(BAD_FRAMES, f"{command}: {len(frames) - 3} payload frame(s); expected {expected}", command)
    return Message(command, header, list(frames[3:]))


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_header(body: bytes, command: str) -> object:
    """The JSON value of a header frame: strict UTF-8 (``json.loads`` on bytes would also take
    UTF-16 and UTF-32), no NaN or Infinity, no lone surrogates (they cannot be written to a log,
    a path or the journal); BAD_JSON says which rule was broken."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolError(BAD_JSON, f"{command}: header is not UTF-8 ({e.reason} at byte {e.start})", command) from None
    try:
        header = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise ProtocolError(BAD_JSON, f"{command}: header is not a JSON document ({e})", command) from None
    except RecursionError:
        raise ProtocolError(BAD_JSON, f"{command}: header nests too deeply", command) from None
    if _has_surrogate(header):
        raise ProtocolError(BAD_JSON, f"{command}: header holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                      "which is not a character", command)
    return header


def _has_surrogate(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def tile_pixels(header: dict, payload: bytes, max_tile_pixels: int) -> np.ndarray:
    """The ``[H, W, 3]`` array a TILE carries (a view on ``payload``); BAD_TILE / TOO_LARGE if it does not fit."""
    height, width, channels = header["shape"]
    if height * width > max_tile_pixels:
        raise ProtocolError(TOO_LARGE, f"TILE {header['tile_index']}: {width}×{height} px exceeds the limit of "
                                       f"{max_tile_pixels} px per tile", TILE)
    dtype = np.dtype(TILE_DTYPES[header["dtype"]])
    expected = height * width * channels * dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError(BAD_TILE, f"TILE {header['tile_index']}: pixel frame has {len(payload)} bytes; shape "
                                      f"{header['shape']} {header['dtype']} needs {expected}", TILE)
    return np.frombuffer(payload, dtype=dtype).reshape(height, width, channels)


def encode_record(record: dict) -> bytes:
    """The canonical bytes of a cell record (sorted keys, no spaces): journaled once, resent unchanged."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def records_digest(records: Iterable[bytes]) -> str:
    """``sha256:<hex>`` over record_1 + LF + record_2 + LF ...: what SUMMARY.digest promises."""
    h = hashlib.sha256()
    for record in records:
        h.update(record)
        h.update(b"\n")
    return "sha256:" + h.hexdigest()
