"""A bounded run of benchmarks/bench_service_faults.py (the full run writes RESULTS.md): fuzzed
frames, kill -9 under concurrent clients, a soak with abandoned streams, on a daemon subprocess."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_service_faults as bench  # noqa: E402


def test_fuzzed_frames_are_each_answered_never_internal(tmp_path):
    result = bench.bench_fuzz(tmp_path, frames=1500)
    assert result["answered"] == 1500 and result["unanswered"] == result["extra_replies"] == 0
    assert result["internal"] == 0 and result["alive"] and result["still_serves"] and result["exit_code"] == 0
    assert {"PATH_REFUSED", "BAD_JSON", "BAD_HEADER", "REQUEST_CONFLICT", "TOO_LARGE"} <= set(result["codes"])


def test_kill_9_under_concurrent_clients_delivers_every_cell_once(tmp_path):
    result = bench.bench_kill9(tmp_path, kills=3, clients=2)
    assert result["jobs"] >= 2 and result["cells"] > 0
    assert result["duplicates"] == result["wrong_jobs"] == result["hung_clients"] == 0, result["failures"]
    assert result["failures"] == [] and result["exit_code"] == 0


def test_soak_with_abandoned_streams_leaves_nothing_stuck(tmp_path):
    result = bench.bench_soak(tmp_path, jobs=40, idle_s=1.0)
    assert result["finished"] == 36 and result["abandoned"] == 4 and result["expired_wrongly"] == 0
    assert result["active_after"] == 0 and result["pending_tiles_after"] == 0 and result["exit_code"] == 0
