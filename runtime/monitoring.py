"""Quality control of the analyser over time: Westgard-style rules on the run log's per-slide rates.

A lab runs controls on a Levey–Jennings chart and rejects a run by Westgard's rules; cytoedge has no
control material, but every slide it scores is a sample of the lab's own case mix, and a case mix
changes slowly. So the slides themselves are the control series: a jump in the share of cells
called abnormal, in the share sent to review, or in the out-of-domain statistic, while the lab's
patients stay the same, means the stain, the scanner or the model changed. The rules:

- 1-3s: one slide beyond the mean ± 3 SD;
- 2-2s: two slides in a row beyond the same mean ± 2 SD;
- R-4s: two slides in a row on opposite sides, one beyond +2 SD, the other beyond −2 SD;
- 4-1s: four in a row beyond the same mean ± 1 SD;
- 10-x: ten in a row on the same side of the mean.

The mean and SD are a rolling baseline: the ``baseline_runs`` slides before the one judged, leaving
out slides that broke a rule (Westgard: a rejected run does not set the limits), so a lasting shift
keeps alarming until someone acts. The baseline starts again after a model change (another bundle
hash: its rates are its own) and after a recorded revalidation (the lab has checked the analyser
against its readers and accepted the current level); the first ``baseline_runs`` slides after
either are the baseline and are not judged.

A slide's rate is binomial: its sampling SD is sqrt(p(1-p)/n) for n cells, and a short baseline of
similar slides can have an SD near zero, which would make every later slide an alarm. The SD used
is therefore never below that binomial SD (p: the baseline's pooled rate with Laplace's +1/+2, never
0 or 1; n: the judged slide's cell count). The domain statistic is the slide's shift over its
calibrated threshold (runtime/domain_alarm.py: 1 = the slide's own alarm); its floor is the SD the
shift has on in-domain cells — the length of a mean of n unit vectors' two coordinates is Rayleigh
with SD sqrt((4 − π)/2)/sqrt(n) — over the same threshold.

Besides the rules: the domain statistic drifts when the slide-level out-of-domain alarm was raised on
``domain_alarms`` or more of the last ``domain_window`` assessed slides; and revalidation is due when
the last one is more than ``revalidate_days`` old, or there has been none. Pure functions: the run log
is read by runtime/run_log.py, printed and drawn by runtime/commands/monitor.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from cytoedge.runtime.errors import CytoedgeError

RULES = ("1-3s", "2-2s", "R-4s", "4-1s", "10-x")
METRICS = ("abnormal_rate", "escalation_rate", "domain_ratio")
METRIC_LABELS = {"abnormal_rate": "abnormal rate", "escalation_rate": "escalation rate",
                 "domain_ratio": "domain shift / threshold"}
RAYLEIGH_SD = math.sqrt((4 - math.pi) / 2)
LOOKBACK = 10  # slides the longest rule (10-x) looks back over


@dataclass(frozen=True)
class MonitorPolicy:
    """What ``cytoedge monitor`` judges by. Defaults: a 20-slide baseline (the usual minimum for a
    control's mean and SD), every rule above, alarms on the last 20 slides, a revalidation at least
    every 30 days, and a domain drift at 3 slide-level alarms among the last 10 assessed slides."""

    baseline_runs: int = 20
    rules: tuple[str, ...] = RULES
    recent_runs: int = 20  # rules broken on these last slides are alarms; older ones are history
    revalidate_days: float = 30.0
    domain_window: int = 10
    domain_alarms: int = 3
    table_days: int = 14  # days in the printed trend table

    def __post_init__(self):
        unknown = sorted(set(self.rules) - set(RULES))
        if unknown:
            raise CytoedgeError(f"rules {unknown} unknown (known: {', '.join(RULES)})")
        for name in ("baseline_runs", "recent_runs", "domain_window", "domain_alarms", "table_days"):
            if getattr(self, name) < 1:
                raise CytoedgeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.revalidate_days > 0:
            raise CytoedgeError(f"revalidate_days must be positive, got {self.revalidate_days}")
        if self.baseline_runs < 2:
            raise CytoedgeError(f"baseline_runs must be at least 2 (an SD needs two slides), got {self.baseline_runs}")


# --- the rules, on z-scores (NaN: a slide not judged, which breaks any run of slides) -----------------------------

def _last(z: np.ndarray, i: int, k: int) -> np.ndarray | None:
    """The ``k`` z-scores ending at ``i``, or None if there are fewer or one of them is not judged."""
    if i + 1 < k:
        return None
    w = z[i - k + 1:i + 1]
    return None if np.isnan(w).any() else w


def _same_side(z: np.ndarray, i: int, k: int, limit: float) -> bool:
    w = _last(z, i, k)
    return w is not None and bool((w > limit).all() or (w < -limit).all())


def _range_4s(z: np.ndarray, i: int) -> bool:
    w = _last(z, i, 2)
    return w is not None and bool((w.max() > 2) and (w.min() < -2))


RULE_TESTS = {
    "1-3s": lambda z, i: _same_side(z, i, 1, 3.0),
    "2-2s": lambda z, i: _same_side(z, i, 2, 2.0),
    "R-4s": _range_4s,
    "4-1s": lambda z, i: _same_side(z, i, 4, 1.0),
    "10-x": lambda z, i: _same_side(z, i, 10, 0.0),
}


def rules_broken(z: np.ndarray, i: int, rules: tuple[str, ...] = RULES) -> tuple[str, ...]:
    """The rules the series of z-scores ``z`` breaks at point ``i`` (each rule looks back from ``i``)."""
    z = np.asarray(z, float)
    return tuple(r for r in rules if RULE_TESTS[r](z, i))


@dataclass
class ControlChart:
    """One metric's chart: per slide its value, the baseline's mean and SD it was judged against (NaN
    while it was part of a baseline, or had no value), its z-score and the rules it broke."""

    values: np.ndarray
    centre: np.ndarray
    sd: np.ndarray
    z: np.ndarray
    broken: list[tuple[str, ...]]


def _z(value: float, mean: float, sd: float) -> float:
    if math.isclose(value, mean, rel_tol=1e-9, abs_tol=1e-15):  # a mean's rounding is not a side of it
        return 0.0
    if sd > 0:
        return (value - mean) / sd
    return math.copysign(math.inf, value - mean)


def control_chart(values, baseline_runs: int, rules: tuple[str, ...] = RULES, trials=None, sd_floor=None,
                  restarts=()) -> ControlChart:
    """Judge each value against the rolling baseline before it (see the module docstring).

    ``trials``: per slide the cell count of a binomial rate (its SD is then floored by the binomial
    one); ``sd_floor``: per slide a lower bound of the SD; ``restarts``: indices where a new baseline
    starts. NaN values are skipped: they neither join a baseline nor break a run."""
    values = np.asarray(values, float)
    n = len(values)
    centre, sd, z = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    broken: list[tuple[str, ...]] = [()] * n
    restarts = set(restarts)
    accepted: list[int] = []
    series: list[float] = []  # z of the slides with a value, in order (NaN: in a baseline): what the rules read
    for i in range(n):
        if i in restarts:
            accepted = []
        if not np.isfinite(values[i]):
            continue
        if len(accepted) < baseline_runs:
            accepted.append(i)
            series.append(math.nan)
            continue
        base = np.array(accepted[-baseline_runs:])
        b = values[base]
        mean, s = float(b.mean()), float(b.std(ddof=1))
        if trials is not None:
            t = np.asarray(trials, float)
            p = (float((b * t[base]).sum()) + 1.0) / (float(t[base].sum()) + 2.0)
            s = max(s, math.sqrt(p * (1 - p) / t[i])) if t[i] > 0 else s
        if sd_floor is not None and np.isfinite(sd_floor[i]):
            s = max(s, float(sd_floor[i]))
        centre[i], sd[i], z[i] = mean, s, _z(float(values[i]), mean, s)
        series.append(z[i])
        recent = np.array(series[-LOOKBACK:])
        broken[i] = rules_broken(recent, len(recent) - 1, rules)
        if not broken[i]:
            accepted.append(i)
    return ControlChart(values, centre, sd, z, broken)


def domain_sd_floor(cells, threshold) -> np.ndarray:
    """Per slide the in-domain SD of its shift over its threshold (module docstring); NaN where unknown."""
    cells, threshold = np.asarray(cells, float), np.asarray(threshold, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        floor = RAYLEIGH_SD / np.sqrt(cells) / threshold
    return np.where((cells > 0) & (threshold > 0), floor, np.nan)


# --- the whole log ----------------------------------------------------------------------------------------------

def parse_time(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], float)


def metric_values(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per metric its value on each row (NaN: none: a failed slide, no cells, domain not assessed)."""
    ok = np.array([r.get("status") == "ok" for r in rows], bool)
    shift, threshold = _column(rows, "domain_shift"), _column(rows, "domain_threshold")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(threshold > 0, shift / threshold, np.nan)
    values = {"abnormal_rate": _column(rows, "abnormal_rate"), "escalation_rate": _column(rows, "escalation_rate"),
              "domain_ratio": ratio}
    return {k: np.where(ok, v, np.nan) for k, v in values.items()}


@dataclass
class MonitorReport:
    """What ``assess`` found (``to_dict`` is the JSON of ``cytoedge monitor --json``)."""

    policy: MonitorPolicy
    rows: list[dict]  # the current bundle's slides, oldest first
    other_bundle_rows: int
    restarts: list[int]  # row indices where a baseline starts (after a revalidation)
    charts: dict[str, ControlChart]
    alarms: list[dict]
    revalidation: dict
    days: list[dict] = field(default_factory=list)

    @property
    def alarm(self) -> bool:
        return bool(self.alarms)

    def to_dict(self) -> dict:
        last = self.rows[-1] if self.rows else {}
        baselines = {}
        for name, chart in self.charts.items():
            judged = np.flatnonzero(np.isfinite(chart.centre))
            baselines[name] = ({"mean": round(float(chart.centre[judged[-1]]), 6),
                                "sd": round(float(chart.sd[judged[-1]]), 6)} if len(judged) else None)
        return {"alarm": self.alarm, "alarms": self.alarms, "revalidation": self.revalidation,
                "bundle_sha256": last.get("bundle_sha256"), "model": last.get("model"), "slides": len(self.rows),
                "other_bundle_slides": self.other_bundle_rows,
                "policy": {"baseline_runs": self.policy.baseline_runs, "rules": list(self.policy.rules),
                           "recent_runs": self.policy.recent_runs, "revalidate_days": self.policy.revalidate_days,
                           "domain_window": self.policy.domain_window, "domain_alarms": self.policy.domain_alarms},
                "baseline": baselines, "days": self.days}


def revalidation_status(revalidations: list[dict], now: datetime, days: float) -> dict:
    """Due when the last revalidation is more than ``days`` old, or there has been none."""
    if not revalidations:
        return {"due": True, "last": None, "days_since": None, "every_days": days,
                "reason": "never revalidated (run `cytoedge compare` against the lab's readers)"}
    last = max(parse_time(r["time"]) for r in revalidations)
    since = (now - last).total_seconds() / 86400.0
    out = {"due": since > days, "last": last.strftime("%Y-%m-%dT%H:%M:%SZ"), "days_since": round(since, 2),
           "every_days": days}
    if out["due"]:
        out["reason"] = f"last revalidation {since:.0f} days ago (due every {days:g} days)"
    return out


def daily_table(rows: list[dict], values: dict[str, np.ndarray], days: int) -> list[dict]:
    """Per UTC day (the last ``days`` days that have slides): slides, pooled rates, mean domain statistic,
    triage mix and seconds per slide."""
    by_day: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_day.setdefault(r["time"][:10], []).append(i)
    out = []
    for day in sorted(by_day)[-days:]:
        idx = by_day[day]
        ok = [i for i in idx if rows[i].get("status") == "ok" and rows[i].get("white_cells")]
        cells = sum(rows[i]["white_cells"] for i in ok)

        def pooled(key: str) -> float | None:
            counted = [rows[i][key] for i in ok if rows[i].get(key) is not None]
            return round(sum(counted) / cells, 6) if cells and len(counted) == len(ok) else None

        ratio = values["domain_ratio"][idx]
        secs = [rows[i]["seconds"] for i in idx if rows[i].get("seconds") is not None]
        triage = {level: sum(rows[i].get("triage") == level for i in idx) for level in ("routine", "review", "urgent")}
        out.append({"day": day, "slides": len(idx), "failed": sum(rows[i].get("status") != "ok" for i in idx),
                    "white_cells": cells, "abnormal_rate": pooled("abnormal"), "escalation_rate": pooled("escalated"),
                    "domain_ratio": round(float(np.nanmean(ratio)), 4) if np.isfinite(ratio).any() else None,
                    "domain_alarms": sum(bool(rows[i].get("domain_raised")) for i in idx), "triage": triage,
                    "seconds_per_slide": round(sum(secs) / len(secs), 3) if secs else None})
    return out


def _row_ref(rows: list[dict], i: int) -> dict:
    return {"index": i, "time": rows[i]["time"], "source": rows[i].get("source_name")}


def assess(runs: list[dict], revalidations: list[dict], now: datetime,
           policy: MonitorPolicy = MonitorPolicy()) -> MonitorReport:
    """Judge the run log: the slides of the bundle in use (the last row's), oldest first."""
    bundle = runs[-1].get("bundle_sha256") if runs else None
    rows = [r for r in runs if r.get("bundle_sha256") == bundle]
    # Only a revalidation of this bundle counts (a new model is revalidated, not the old one's pilot);
    # one that does not say which bundle it was (an older log) counts for any.
    revalidations = [r for r in revalidations if (r.get("details") or {}).get("bundle_sha256") in (None, bundle)]
    starts = sorted({parse_time(r["time"]) for r in revalidations})
    times = [parse_time(r["time"]) for r in rows]
    restarts = sorted({next(i for i, t in enumerate(times) if t > s) for s in starts if times and times[-1] > s})
    restarts = [i for i in restarts if i > 0]
    values = metric_values(rows)
    cells = _column(rows, "white_cells")
    floors = {"abnormal_rate": {"trials": cells}, "escalation_rate": {"trials": cells},
              "domain_ratio": {"sd_floor": domain_sd_floor(cells, _column(rows, "domain_threshold"))}}
    charts = {m: control_chart(values[m], policy.baseline_runs, policy.rules, restarts=restarts, **floors[m])
              for m in METRICS}
    alarms = []
    recent = range(max(0, len(rows) - policy.recent_runs), len(rows))
    for m, chart in charts.items():
        for i in recent:
            if chart.broken[i]:
                alarms.append({"kind": "rule", "metric": m, "rules": list(chart.broken[i]), **_row_ref(rows, i),
                               "value": round(float(chart.values[i]), 6), "mean": round(float(chart.centre[i]), 6),
                               "sd": round(float(chart.sd[i]), 6)})
    assessed = [i for i, r in enumerate(rows) if r.get("status") == "ok" and r.get("domain_assessed")]
    window = assessed[-policy.domain_window:]
    raised = [i for i in window if rows[i].get("domain_raised")]
    if len(raised) >= policy.domain_alarms:
        alarms.append({"kind": "domain_drift", "metric": "domain_alarm", "rules": [], **_row_ref(rows, raised[-1]),
                       "raised": len(raised), "of": len(window),
                       "reason": f"out-of-domain alarm on {len(raised)} of the last {len(window)} assessed slides"})
    revalidation = revalidation_status(revalidations, now, policy.revalidate_days)
    if revalidation["due"]:
        alarms.append({"kind": "revalidation_due", "metric": None, "rules": [], "reason": revalidation["reason"]})
    return MonitorReport(policy, rows, len(runs) - len(rows), restarts, charts, alarms, revalidation,
                         daily_table(rows, values, policy.table_days))
