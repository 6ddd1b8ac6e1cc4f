"""The run log and `cytoedge monitor`: each Westgard rule on hand-made z-scores, the rolling baseline and its
SD floors, the row a slide gives, concurrent writers (threads, and processes on a new file), `cytoedge score` and the daemon appending rows, and the
monitor run as a user runs it — an alarm and a real chart on a log whose abnormal rate jumps, none on a
steady one, and one-line errors on a missing or foreign log. Run-log fixtures are written with the
module's own functions, from synthetic slide summaries."""
from __future__ import annotations

import errno
import json
import logging
import math
import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.runtime import run_log as R
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.monitoring import MonitorPolicy, assess, control_chart, domain_sd_floor, rules_broken

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]
AUDIT = {"model": "test-model", "bundle_sha256": "ab" * 32, "cytoedge_version": "0.1.0", "backend": "onnxruntime-cpu",
         "estimator": "fast"}
NOW = datetime(2025, 6, 30, 12, 0, tzinfo=timezone.utc)
PATTERN = (4, 5, 4, 3)  # abnormal cells of 200 per slide: a steady 2 %, never 10 in a row on one side


def cytoedge(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def summary(n: int = 200, abnormal: int = 4, uncertain: int = 10, anomalous: int = 1, overlap: int = 0,
            shift: float = 0.1, threshold: float = 0.3, raised: bool = False,
            source: str = "/lab/slides/s.png") -> dict:
    """A slide summary as runtime/summary.py shapes it; ``overlap`` cells are both abnormal and uncertain."""
    ids = iter(range(10 ** 6))
    abnormal_cells = [{"id": next(ids)} for _ in range(abnormal)]
    uncertain_cells = abnormal_cells[:overlap] + [{"id": next(ids)} for _ in range(uncertain - overlap)]
    return {"source": source, "counts": {"white_cells": n, "platelets": 40, "red_cells_estimated": 5000},
            "abnormal_cells": abnormal_cells, "uncertain_cells": uncertain_cells,
            "anomalous_cells": [{"id": next(ids)} for _ in range(anomalous)],
            "triage": {"level": "review" if abnormal else "routine", "reasons": []},
            "domain_alarm": {"assessed": True, "raised": raised, "cells": n, "shift": shift, "threshold": threshold}}


def write_log(path: Path, slides: int = 45, jump_from: int | None = None, revalidated_days_ago: float | None = 5,
              start: datetime = NOW - timedelta(days=4)) -> Path:
    """A run log of ``slides`` slides two hours apart ending before NOW; from ``jump_from`` on, 30 of 200
    cells abnormal (15 %)."""
    for i in range(slides):
        abnormal = 30 if jump_from is not None and i >= jump_from else PATTERN[i % 4]
        s = summary(abnormal=abnormal, uncertain=8 + PATTERN[(i + 1) % 4], shift=0.1 + 0.01 * (PATTERN[i % 4] - 4),
                    source=f"/lab/slides/s{i:03d}.png")
        R.append_run(path, R.run_log_row(s, AUDIT, 3.0, start + timedelta(hours=2 * i)))
    if revalidated_days_ago is not None:
        R.record_revalidation(path, start - timedelta(days=revalidated_days_ago), {"kappa": 0.9})
    return path


def z_broken(z, rules=None) -> tuple[str, ...]:
    z = np.array(z, float)
    return rules_broken(z, len(z) - 1) if rules is None else rules_broken(z, len(z) - 1, rules)


# --- the rules -------------------------------------------------------------------------------------------------

def test_1_3s_one_slide_beyond_three_sd():
    assert "1-3s" in z_broken([0.0, 3.2]) and "1-3s" in z_broken([0.0, -3.2])
    assert "1-3s" not in z_broken([0.0, 2.9])


def test_2_2s_two_in_a_row_beyond_the_same_two_sd():
    assert "2-2s" in z_broken([2.5, 2.1]) and "2-2s" in z_broken([-2.5, -2.1])
    assert "2-2s" not in z_broken([2.5, -2.5]) and "2-2s" not in z_broken([2.5, 1.9])


def test_r_4s_two_in_a_row_on_opposite_sides_beyond_two_sd():
    assert "R-4s" in z_broken([2.1, -2.1]) and "R-4s" in z_broken([-2.3, 2.2])
    assert "R-4s" not in z_broken([1.9, -2.5]) and "R-4s" not in z_broken([2.5, 2.5])


def test_4_1s_four_in_a_row_beyond_the_same_one_sd():
    assert "4-1s" in z_broken([1.5, 1.2, 1.1, 1.9]) and "4-1s" in z_broken([-1.2] * 4)
    assert "4-1s" not in z_broken([1.5, 1.5, 0.5, 1.5]) and "4-1s" not in z_broken([1.5, -1.5, 1.5, 1.5])
    assert "4-1s" not in z_broken([1.5] * 3)


def test_10_x_ten_in_a_row_on_one_side_of_the_mean():
    assert "10-x" in z_broken([0.3] * 10) and "10-x" in z_broken([-0.1] * 12)
    assert "10-x" not in z_broken([0.3] * 9) and "10-x" not in z_broken([0.3] * 9 + [0.0])


def test_a_slide_not_judged_breaks_a_run_and_rules_can_be_chosen():
    assert "2-2s" not in z_broken([2.5, np.nan, 2.5])
    assert z_broken([0.0, 3.5, 3.5], rules=("2-2s",)) == ("2-2s",)
    assert z_broken([0.1, -0.2, 0.3]) == ()


def test_policy_refuses_unknown_rules_and_a_one_slide_baseline():
    with pytest.raises(CytoedgeError, match="unknown"):
        MonitorPolicy(rules=("1-2s",))
    with pytest.raises(CytoedgeError, match="baseline_runs"):
        MonitorPolicy(baseline_runs=1)


# --- the baseline -----------------------------------------------------------------------------------------------

def test_a_zero_sd_baseline_is_floored_by_the_binomial_sd():
    values = [0.02] * 20 + [0.025]  # 4 of 200 cells every day, then 5 of 200
    plain = control_chart(values, 20)
    assert plain.sd[20] < 1e-12 and plain.z[20] > 1e9 and "1-3s" in plain.broken[20]  # one cell more: "alarm"
    floored = control_chart(values, 20, trials=np.full(21, 200))
    p = (0.02 * 200 * 20 + 1) / (200 * 20 + 2)
    assert floored.sd[20] == pytest.approx(math.sqrt(p * (1 - p) / 200))
    assert floored.broken[20] == ()


def test_the_baseline_rolls_but_leaves_rule_breakers_out():
    rng = np.random.default_rng(0)
    steady = 0.5 + 0.01 * rng.standard_normal(30)
    values = np.concatenate([steady, np.full(40, 0.8)])  # a lasting shift, 40 slides: more than a baseline
    chart = control_chart(values, 20)
    assert np.isnan(chart.centre[:20]).all()  # the first baseline is not judged
    assert all(chart.broken[i] for i in range(30, 70))  # still an alarm 40 slides on: never absorbed
    accepted = [i for i in range(30) if not chart.broken[i]]
    assert chart.centre[69] == pytest.approx(values[accepted[-20:]].mean())


def test_a_restart_takes_a_new_baseline_and_missing_values_are_skipped():
    values = np.concatenate([np.full(25, 0.5), np.full(25, 0.8)])
    values[[3, 30]] = np.nan
    chart = control_chart(values, 10, sd_floor=np.full(50, 0.01), restarts=[25])
    assert chart.broken[20] == () and not np.isnan(chart.centre[20])
    assert np.isnan(chart.centre[25:36]).all()  # ten valued slides after the restart form its baseline
    assert chart.centre[40] == pytest.approx(0.8) and chart.broken[40] == ()


def test_the_domain_floor_is_the_rayleigh_sd_over_the_threshold():
    floor = domain_sd_floor([100, 0, 100], [0.25, 0.25, None])
    assert floor[0] == pytest.approx(math.sqrt((4 - math.pi) / 2) / 10 / 0.25)
    assert np.isnan(floor[1:]).all()


# --- the whole log ----------------------------------------------------------------------------------------------

def rows(n: int, start: datetime = NOW - timedelta(days=3), **changes) -> list[dict]:
    out = []
    for i in range(n):
        s = summary(abnormal=PATTERN[i % 4], **{k: v(i) for k, v in changes.items()})
        out.append(R.run_log_row(s, AUDIT, 3.0, start + timedelta(hours=i)))
    return out


def test_a_steady_log_raises_nothing_and_a_jump_is_found_on_both_rates(tmp_path):
    revalidated = [{"time": R.utc_text(NOW - timedelta(days=2)), "details": {}}]
    steady = assess(rows(45, start=NOW - timedelta(days=1)), revalidated, NOW)
    assert steady.alarms == [] and not steady.alarm
    runs = rows(45, start=NOW - timedelta(days=1))
    for r in runs[40:]:
        escalated = r["escalated"] + 26
        r.update(abnormal=30, abnormal_rate=0.15, escalated=escalated, escalation_rate=escalated / 200)
    jumped = assess(runs, revalidated, NOW)
    metrics = {a["metric"] for a in jumped.alarms}
    assert metrics == {"abnormal_rate", "escalation_rate"}
    first = min(a["index"] for a in jumped.alarms)
    assert first == 40 and "1-3s" in jumped.alarms[0]["rules"]


def test_domain_drift_when_the_slide_alarm_repeats():
    revalidated = [{"time": R.utc_text(NOW - timedelta(days=1)), "details": {}}]
    runs = rows(30, raised=lambda i: i in (22, 25, 28), shift=lambda i: 0.5 if i in (22, 25, 28) else 0.1)
    report = assess(runs, revalidated, NOW, MonitorPolicy(rules=()))
    assert [a["kind"] for a in report.alarms] == ["domain_drift"]
    assert report.alarms[0]["raised"] == 3 and report.alarms[0]["of"] == 10
    assert assess(runs[:-3], revalidated, NOW, MonitorPolicy(rules=())).alarms == []  # two of ten: not yet


def test_revalidation_due_after_the_set_days_or_when_never_done():
    runs = rows(5)
    never = assess(runs, [], NOW)
    assert [a["kind"] for a in never.alarms] == ["revalidation_due"] and "never" in never.alarms[0]["reason"]
    old = [{"time": R.utc_text(NOW - timedelta(days=40)), "details": {}}]
    assert assess(runs, old, NOW).revalidation["due"]
    assert not assess(runs, old, NOW, MonitorPolicy(revalidate_days=45)).revalidation["due"]


def test_only_the_bundle_in_use_is_judged_and_a_revalidation_restarts_the_baseline():
    other = [{**r, "bundle_sha256": "cd" * 32} for r in rows(10, start=NOW - timedelta(days=5))]
    current = rows(30, start=NOW - timedelta(days=2))
    revalidated = [{"time": current[12]["time"][:-1] + ".5Z", "details": {}}]
    report = assess(other + current, revalidated, NOW)
    assert len(report.rows) == 30 and report.other_bundle_rows == 10
    assert report.restarts == [13]
    assert np.isnan(report.charts["abnormal_rate"].centre).all()  # 13 + 17 slides: no baseline of 20 yet


def test_a_revalidation_of_another_bundle_does_not_count_for_the_one_in_use():
    runs = rows(5)
    recent = R.utc_text(NOW - timedelta(days=1))
    old_model = [{"time": recent, "details": {"bundle_sha256": "cd" * 32}}]
    this_model = [{"time": recent, "details": {"bundle_sha256": runs[-1]["bundle_sha256"]}}]
    assert assess(runs, old_model, NOW).revalidation["due"]
    assert not assess(runs, this_model, NOW).revalidation["due"]


# --- the run log ------------------------------------------------------------------------------------------------

def test_the_row_of_a_slide_has_counts_rates_and_the_file_name_only():
    entry = {"source": "/data/patients/DOE^JOHN/slide-7.dcm", "status": "ok",
             "summary": summary(n=200, abnormal=6, uncertain=10, anomalous=2, overlap=3, shift=0.2, threshold=0.4)}
    row = R.run_log_row(entry, AUDIT, 4.56789, datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert row["time"] == "2025-01-02T03:04:05Z" and row["command"] == "score"
    assert row["source_name"] == "slide-7.dcm"
    assert (row["white_cells"], row["abnormal"], row["uncertain"], row["anomalous"]) == (200, 6, 10, 2)
    assert row["escalated"] == 6 + 10 + 2 - 3  # a cell both abnormal and uncertain is escalated once
    assert row["abnormal_rate"] == 0.03 and row["escalation_rate"] == 0.075
    domain = (row["domain_assessed"], row["domain_raised"], row["domain_shift"], row["domain_threshold"])
    assert domain == (1, 0, 0.2, 0.4)
    assert row["bundle_sha256"] == AUDIT["bundle_sha256"] and row["seconds"] == 4.5679
    assert set(row) == {name for name, _ in R.RUN_COLUMNS}
    failed = R.run_log_row({"source": "/x/y.png", "status": "error", "error": "/x/y.png: unreadable"}, AUDIT, 0.1, NOW)
    assert failed["status"] == "error" and failed["white_cells"] is None and "unreadable" not in json.dumps(failed)


def test_append_and_read_back_from_concurrent_writers(tmp_path):
    path = tmp_path / "sub" / "runlog.sqlite"
    errors = []

    def writer(k: int) -> None:
        try:
            for i in range(10):
                R.append_run(path, R.run_log_row(summary(source=f"w{k}-{i}.png"), AUDIT, 1.0, NOW))
        except Exception as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r["source_name"] for r in R.read_runs(path)) == sorted(f"w{k}-{i}.png" for k in range(4)
                                                                        for i in range(10))
    R.record_revalidation(path, NOW, {"kappa": 0.8})
    assert R.read_revalidations(path) == [{"time": R.utc_text(NOW), "details": {"kappa": 0.8}}]


def _append_at_barrier(path: Path, k: int, barrier, results) -> None:
    barrier.wait()
    try:
        for i in range(3):
            R.append_run(path, R.run_log_row(summary(source=f"p{k}-{i}.png"), AUDIT, 1.0, NOW))
        results.put(None)
    except Exception as e:  # sent back to the test
        results.put(repr(e))


def test_processes_starting_together_on_a_new_log_all_write(tmp_path):
    """Eight processes released at once on a file that does not exist yet: they used to race to switch it to
    WAL, and SQLite refused a few writers in a thousand with "database is locked", without waiting."""
    ctx = multiprocessing.get_context("fork")
    errors = []
    for trial in range(40):
        path = tmp_path / f"log{trial}.sqlite"
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_append_at_barrier, args=(path, k, barrier, results)) for k in range(8)]
        for proc in procs:
            proc.start()
        errors += [e for e in (results.get(timeout=60) for _ in procs) if e]
        for proc in procs:
            proc.join()
        assert errors or len(R.read_runs(path)) == 24
    assert errors == []
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")]  # no build file left behind


def test_a_new_log_has_the_umasks_mode_and_is_made_where_hard_links_fail(tmp_path, monkeypatch):
    """The daemon's log is read by other users' runs and the monitor: it gets the mode sqlite3 would give it,
    not a temporary file's 0600; on a filesystem without hard links it is made in place."""
    old = os.umask(0o022)
    try:
        assert R.record_slide(tmp_path / "a.sqlite", summary(), AUDIT, 1.0, "score") is True
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.sqlite").stat().st_mode) == 0o644

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(R.os, "link", no_links)
    assert R.record_slide(tmp_path / "b.sqlite", summary(), AUDIT, 1.0, "score") is True
    assert len(R.read_runs(tmp_path / "b.sqlite")) == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".new")]


def test_a_log_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE patients (name TEXT)")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    with caplog.at_level(logging.WARNING, logger="cytoedge.runtime.run_log"):
        for path in (foreign, text, tmp_path):
            assert R.record_slide(path, summary(), AUDIT, 1.0, "score") is False
    assert len(caplog.records) == 3 and all("run log" in r.getMessage() for r in caplog.records)
    assert "not a cytoedge run log" in caplog.records[0].getMessage()
    assert R.record_slide(None, summary(), AUDIT, 1.0, "score") is False


def test_reading_refuses_a_missing_or_foreign_file_by_name(tmp_path):
    for path, words in ((tmp_path / "none.sqlite", "no such file"), (tmp_path, "a folder")):
        with pytest.raises(R.RunLogError, match=words) as e:
            R.read_runs(path)
        assert str(path) in str(e.value)
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    with pytest.raises(R.RunLogError, match="not a cytoedge run log"):
        R.read_runs(text)


def test_where_the_log_lives(tmp_path, monkeypatch):
    monkeypatch.setenv(R.ENV_VAR, str(tmp_path / "env.sqlite"))
    assert R.default_run_log() == tmp_path / "env.sqlite"
    assert R.resolve_run_log(tmp_path / "flag.sqlite", False) == tmp_path / "flag.sqlite"
    assert R.resolve_run_log(tmp_path / "flag.sqlite", True) is None
    monkeypatch.delenv(R.ENV_VAR)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert R.resolve_run_log(None, False) == tmp_path / "data" / "cytoedge" / "runlog.sqlite"


# --- the hooks: the daemon and `cytoedge score` ------------------------------------------------------------------

def test_the_daemon_logs_each_scored_slide(tmp_path):
    from cytoedge.runtime.service.client import ScannerLinkClient
    from test_service_daemon import running_daemon, write_slide

    path, rgb = write_slide(tmp_path / "slides", "a.png", 1)
    log_path = tmp_path / "runlog.sqlite"
    with running_daemon(tmp_path, run_log=log_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=10) as c:
        c.wait_result(c.submit_path(path))
        stream = c.open_stream("scan-1", um_per_px=0.25)
        c.send_tile(stream, 0, rgb[:48], (0, 0))
        c.end_of_slide(stream, 1)
        c.wait_result(stream)
        deadline = time.monotonic() + 10
        while (not log_path.exists() or len(R.read_runs(log_path)) < 2) and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker logs a job just after journaling it as scored
        logged = R.read_runs(log_path)
    assert [r["command"] for r in logged] == ["serve", "serve"]
    assert all(r["model"] == "pixel-stats-test-scorer" and r["bundle_sha256"] == "0" * 64 for r in logged)
    assert all(r["status"] == "ok" and r["seconds"] >= 0 for r in logged)


def test_the_daemon_scores_on_when_its_log_cannot_be_written(tmp_path):
    from cytoedge.runtime.service.client import ScannerLinkClient
    from test_service_daemon import running_daemon, write_slide

    path, _ = write_slide(tmp_path / "slides", "a.png", 2)
    with running_daemon(tmp_path, run_log=tmp_path) as daemon, ScannerLinkClient(daemon.endpoint, timeout_s=10) as c:
        records, result = c.wait_result(c.submit_path(path))
    assert records and result["state"] in ("scored", "delivered")


@pytest.fixture(scope="module")
def field(bundle, ort_backend, tmp_path_factory) -> tuple[Path, float]:
    """A field with four white cells drawn by the bundled model."""
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))
    path = tmp_path_factory.mktemp("field") / "smear.png"
    cv2.imwrite(str(path), smear.rgb[..., ::-1])
    return path, smear.um_per_px


def test_score_appends_one_row_per_slide(field, tmp_path):
    path, um_per_px = field
    log_path = tmp_path / "runlog.sqlite"
    run = cytoedge("score", path, "--out", tmp_path / "out", "--quiet", "--threads", "1", "--no-heatmaps",
                   "--um-per-px", um_per_px, env={R.ENV_VAR: str(log_path)})
    assert run.returncode == 0, run.stderr
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    s = doc["slides"][0]["summary"]
    [row] = R.read_runs(log_path)
    assert row["command"] == "score" and row["status"] == "ok" and row["source_name"] == "smear.png"
    assert (row["bundle_sha256"], row["model"], row["cytoedge_version"]) == (doc["bundle_sha256"], doc["model"],
                                                                            doc["cytoedge_version"])
    assert row["white_cells"] == s["counts"]["white_cells"] == len(doc["slides"][0]["cells"]) > 0
    assert row["abnormal"] == len(s["abnormal_cells"]) and row["triage"] == s["triage"]["level"]
    assert row["platelets"] == s["counts"]["platelets"] and row["red_cells"] == s["counts"]["red_cells_estimated"]
    assert row["domain_assessed"] == int(s["domain_alarm"]["assessed"])
    assert row["seconds"] == pytest.approx(doc["run"]["timings_s"][str(path)]["total"], abs=1e-3)


# --- `cytoedge monitor` ------------------------------------------------------------------------------------------

def test_monitor_raises_an_alarm_on_a_jump_and_draws_it(tmp_path):
    log_path = write_log(tmp_path / "jump.sqlite", jump_from=40, start=datetime.now(timezone.utc) - timedelta(days=4))
    chart = tmp_path / "chart.png"
    run = cytoedge("monitor", "--run-log", log_path, "--chart", chart)
    assert run.returncode == 1, run.stderr
    assert "ALARM" in run.stdout and "abnormal rate: 1-3s" in run.stdout and "first slide 41" in run.stdout
    image = cv2.imread(str(chart))
    assert image is not None and image.shape[1] == 1400 and image.shape[0] > 900
    assert (np.abs(image.astype(int) - [40, 40, 215]).sum(axis=2) < 30).any()  # the alarm points' red
    report = json.loads(cytoedge("monitor", "--run-log", log_path, "--json").stdout)
    assert report["alarm"] and {a["metric"] for a in report["alarms"]} == {"abnormal_rate", "escalation_rate"}


def test_monitor_is_quiet_on_a_steady_log(tmp_path):
    log_path = write_log(tmp_path / "steady.sqlite", start=datetime.now(timezone.utc) - timedelta(days=4))
    run = cytoedge("monitor", "--run-log", log_path, "--chart", tmp_path / "chart.png", "--runs")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no alarm" in run.stdout and "s044.png" in run.stdout
    assert cv2.imread(str(tmp_path / "chart.png")) is not None
    due = cytoedge("monitor", "--run-log", log_path, "--revalidate-days", "2")
    assert due.returncode == 1 and "revalidation due" in due.stdout


def test_monitor_refuses_bad_input_in_one_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    for path, words in ((tmp_path / "missing.sqlite", "no such file"), (text, "not a cytoedge run log")):
        run = cytoedge("monitor", "--run-log", path)
        assert run.returncode == 2
        assert run.stderr.strip().splitlines() == [run.stderr.strip()]
        assert run.stderr.startswith(f"cytoedge monitor: {path}: ") and words in run.stderr
    missing_env = cytoedge("monitor", env={R.ENV_VAR: str(tmp_path / "env.sqlite")})
    assert missing_env.returncode == 2 and str(tmp_path / "env.sqlite") in missing_env.stderr
    log_path = write_log(tmp_path / "ok.sqlite", slides=3)
    bad = cytoedge("monitor", "--run-log", log_path, "--baseline", "1")
    assert bad.returncode == 2 and "baseline_runs" in bad.stderr and "Traceback" not in bad.stderr
