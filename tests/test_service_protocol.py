"""Protocol v1 codec, schemas and the SQLite journal, without sockets."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from cytoedge.runtime.service import journal as J
from cytoedge.runtime.service import protocol as P

DOCS = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def test_every_command_has_a_valid_schema():
    for direction, commands in (("client", P.CLIENT_COMMANDS), ("server", P.SERVER_COMMANDS)):
        for command in commands:
            Draft202012Validator.check_schema(P.validator(direction, command).schema)
    error_codes = set(P.validator("server", P.ERROR).schema["properties"]["code"]["enum"])
    module_codes = {v for k, v in vars(P).items() if k.isupper() and isinstance(v, str) and v == k and v not in
                    P.CLIENT_COMMANDS + P.SERVER_COMMANDS}
    assert error_codes == module_codes


def test_tile_round_trip_is_raw_bytes_not_pickle(rng):
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    header = {"job_id": "a" * 32, "tile_index": 3, "shape": [5, 7, 3], "dtype": "uint8", "origin_xy": [10, 20]}
    frames = P.encode(P.TILE, header, (memoryview(rgb).cast("B"),))
    assert frames[0] == b"1" and frames[1] == b"TILE" and bytes(frames[3]) == rgb.tobytes()
    msg = P.decode([bytes(f) for f in frames], "client", 1024)
    assert msg.header == header
    np.testing.assert_array_equal(P.tile_pixels(msg.header, msg.payload[0], 100), rgb)
    with pytest.raises(P.ProtocolError) as short:
        P.tile_pixels(header, rgb.tobytes()[:-1], 100)
    assert short.value.code == P.BAD_TILE
    with pytest.raises(P.ProtocolError) as large:
        P.tile_pixels(header, rgb.tobytes(), 34)
    assert large.value.code == P.TOO_LARGE


@pytest.mark.parametrize("frames, code", [
    ([b"1", b"HELLO"], P.BAD_FRAMES),
    ([b"2", b"HELLO", b"{}"], P.UNSUPPORTED_VERSION),
    ([b"1", b"PING", b"{}"], P.UNKNOWN_COMMAND),
    ([b"1", b"HELLO", b"{"], P.BAD_JSON),
    ([b"1", b"HELLO", b'{"versions": [1], "x": 2}'], P.BAD_HEADER),
    ([b"1", b"HELLO", b'{"versions": [1], "client": "' + b"c" * 300 + b'"}'], P.TOO_LARGE),
    ([b"1", b"STATUS", b"{}", b"extra"], P.BAD_FRAMES),
])
def test_decode_refuses_with_the_right_code(frames, code):
    with pytest.raises(P.ProtocolError) as refused:
        P.decode(frames, "client", 256)
    assert refused.value.code == code


def test_bad_header_names_the_field():
    with pytest.raises(P.ProtocolError, match=r"\$\.source"):
        P.decode([b"1", b"SUBMIT", json.dumps({"request_id": "r", "source": {"kind": "path"}}).encode()], "client", 1024)


def test_digest_is_sha256_over_record_lines():
    records = [P.encode_record({"b": 1.5, "a": [1, 2]}), P.encode_record({"class": "lymphocyte"})]
    assert records[0] == b'{"a":[1,2],"b":1.5}'
    assert P.records_digest(records) == "sha256:" + hashlib.sha256(b"".join(r + b"\n" for r in records)).hexdigest()
    with pytest.raises(ValueError):
        P.encode_record({"x": float("nan")})


def test_protocol_doc_covers_every_command_and_error_code():
    text = DOCS.read_text()
    for name in set(P.CLIENT_COMMANDS + P.SERVER_COMMANDS) | set(P.validator("server", P.ERROR).schema["properties"]["code"]["enum"]):
        assert re.search(rf"`{name}`", text), f"docs/protocol.md does not describe {name}"


def test_journal_is_wal_and_jobs_are_idempotent(tmp_path):
    journal = J.Journal(tmp_path / "j.sqlite3")
    assert journal.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    job, dup = journal.create_job("req-1", {"kind": "path", "path": "/s.png"}, 16)
    again, dup2 = journal.create_job("req-1", {"kind": "path", "path": "/s.png"}, 16)
    assert (dup, dup2, again.job_id) == (False, True, job.job_id)
    journal.append_cells(job.job_id, 1, [b"a", b"b", b"c"])
    with pytest.raises(sqlite3.IntegrityError):
        journal.append_cells(job.job_id, 3, [b"c2"])  # a sequence number is written once
    assert journal.record_ack(job.job_id, 2) == 2
    assert journal.record_ack(job.job_id, 1) == 2  # acknowledgements never go back
    assert journal.record_ack(job.job_id, 99) == 3  # nor past what exists
    assert journal.cells(job.job_id, 2, 3) == [(2, b"b"), (3, b"c")]
    assert journal.finish(job.job_id, J.SCORED, digest=P.records_digest([b"a", b"b", b"c"]))
    assert not journal.finish(job.job_id, J.FAILED)  # a finished job stays finished
    assert journal.mark_delivered(job.job_id) and journal.job(job.job_id).state == J.DELIVERED
    journal.close()
    reopened = J.Journal(tmp_path / "j.sqlite3")
    assert reopened.all_records(job.job_id) == [b"a", b"b", b"c"]
    assert reopened.purge(older_than_s=-1) == 1 and reopened.job(job.job_id) is None


def test_journal_work_order_follows_arrival(tmp_path):
    journal = J.Journal(tmp_path / "j.sqlite3")
    stream, _ = journal.create_job("s", {"kind": "stream", "name": "scan", "um_per_px": 0.3}, 16)
    path_job, _ = journal.create_job("p", {"kind": "path", "path": "/s.png"}, 16)
    assert journal.add_tile(stream.job_id, 0, {"shape": [1, 1, 3]}, b"\0\0\0")
    assert not journal.add_tile(stream.job_id, 0, {"shape": [1, 1, 3]}, b"\0\0\0")
    kind, job, ordinal = journal.next_work()
    assert (kind, job.job_id) == ("tile", stream.job_id)  # the stream came first
    journal.complete_tile(stream.job_id, ordinal, 1, [b"r1"], {"state": 1})
    assert journal.tile_counts(stream.job_id) == (1, 1)
    assert journal.db.execute("SELECT pixels FROM tiles WHERE ordinal = ?", (ordinal,)).fetchone()[0] is None
    assert journal.job(stream.job_id).checkpoint == {"state": 1} and journal.job(stream.job_id).cells == 1
    assert journal.next_work()[:2][0] == "job"
    journal.set_scoring(path_job.job_id)
    assert journal.requeue_interrupted(3) == (1, [])  # what a restart does with a job caught mid-scoring
    journal.set_tiles_expected(stream.job_id, 1)
    journal.request_cancel(path_job.job_id)
    assert journal.next_work()[0] == "cancel"
    journal.finish(path_job.job_id, J.CANCELLED)
    kind, job, _ = journal.next_work()
    assert (kind, job.job_id) == ("end", stream.job_id)
