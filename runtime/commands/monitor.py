"""``cytoedge monitor``: trends and alarms from the run log that ``score`` and ``serve`` append to.

Prints the abnormal rate, the escalation rate, the out-of-domain statistic, the triage mix and the
seconds per slide per day (or per slide with ``--runs``), judges the rates and the domain statistic
by Westgard-style rules on a rolling baseline, says whether revalidation is due, and with ``--chart``
draws the control charts as a PNG. The rules and defaults: runtime/monitoring.py, docs/monitoring.md.

Exit code: 0 no alarm; 1 an alarm (a rule broken on a recent slide, domain drift, or revalidation
due); 2 bad input (no run log at the path, a file that is not one, a bad option).
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from cytoedge.runtime.monitoring import MonitorPolicy


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="trends, control-rule alarms and revalidation from the run log",
                       description=__doc__)
    p.add_argument("--run-log", type=Path, default=None, metavar="PATH",
                   help="the run log (default: $CYTOEDGE_RUN_LOG, else ~/.local/share/cytoedge/runlog.sqlite)")
    p.add_argument("--chart", type=Path, default=None, metavar="PNG", help="write the control charts here")
    p.add_argument("--baseline", type=int, default=None, metavar="N",
                   help=f"slides in the rolling baseline (default {MonitorPolicy.baseline_runs})")
    p.add_argument("--recent", type=int, default=None, metavar="N",
                   help="a rule broken on one of the last N slides is an alarm "
                        f"(default {MonitorPolicy.recent_runs})")
    p.add_argument("--revalidate-days", type=float, default=None, metavar="D",
                   help="revalidation is due this many days after the last one "
                        f"(default {MonitorPolicy.revalidate_days:g})")
    p.add_argument("--runs", action="store_true", help="a table of the recent slides instead of one row per day")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(func=run)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def day_lines(days: list[dict]) -> list[str]:
    head = f"{'day (UTC)':<11} {'slides':>6} {'failed':>6} {'cells':>7} {'abnormal':>8} {'escalated':>9} " \
           f"{'domain':>6} {'dom.alarms':>10} {'routine/review/urgent':>21} {'s/slide':>7}"
    lines = [head]
    for d in days:
        t = d["triage"]
        mix = f"{t['routine']}/{t['review']}/{t['urgent']}"
        lines.append(f"{d['day']:<11} {d['slides']:>6} {d['failed']:>6} {d['white_cells']:>7} "
                     f"{_pct(d['abnormal_rate']):>8} {_pct(d['escalation_rate']):>9} {_num(d['domain_ratio']):>6} "
                     f"{d['domain_alarms']:>10} {mix:>21} {_num(d['seconds_per_slide']):>7}")
    return lines


def run_lines(report) -> list[str]:
    rows = report.rows[-report.policy.recent_runs:]
    first = len(report.rows) - len(rows)
    ratio = report.charts["domain_ratio"].values
    lines = [f"{'#':>5} {'time (UTC)':<20} {'slide':<24} {'cells':>6} {'abnormal':>8} {'escalated':>9} "
             f"{'domain':>6} {'triage':<8} {'s':>7}  rules"]
    for k, r in enumerate(rows):
        i = first + k
        broken = [f"{m.split('_')[0]} {','.join(c.broken[i])}" for m, c in report.charts.items() if c.broken[i]]
        dom = None if ratio[i] != ratio[i] else float(ratio[i])
        lines.append(f"{i + 1:>5} {r['time']:<20} {(r.get('source_name') or '-')[:24]:<24} "
                     f"{r.get('white_cells') if r.get('white_cells') is not None else '-':>6} "
                     f"{_pct(r.get('abnormal_rate')):>8} {_pct(r.get('escalation_rate')):>9} {_num(dom):>6} "
                     f"{r.get('triage') or r.get('status'):<8} {_num(r.get('seconds')):>7}  "
                     f"{'; '.join(broken)}".rstrip())
    return lines


def alarm_lines(alarms: list[dict]) -> list[str]:
    """One line per metric whose rules broke (its first and latest slide), domain drift, revalidation."""
    from cytoedge.runtime.monitoring import METRIC_LABELS, RULES

    lines = []
    rule_alarms: dict[str, list[dict]] = {}
    for alarm in alarms:
        if alarm["kind"] == "rule":
            rule_alarms.setdefault(alarm["metric"], []).append(alarm)
    for metric, found in rule_alarms.items():
        fmt = (lambda v: f"{v:.2f}") if metric == "domain_ratio" else (lambda v: f"{v:.1%}")
        rules = [r for r in RULES if any(r in a["rules"] for a in found)]
        first, latest = found[0], found[-1]
        lines.append(f"{METRIC_LABELS[metric]}: {', '.join(rules)} broken on {len(found)} slide"
                     f"{'s' if len(found) > 1 else ''}, first slide {first['index'] + 1} ({first['time']}, "
                     f"{first['source'] or '-'}); latest {fmt(latest['value'])} against baseline "
                     f"{fmt(latest['mean'])} ± {fmt(latest['sd'])} SD")
    for alarm in alarms:
        if alarm["kind"] == "domain_drift":
            lines.append(f"domain drift: {alarm['reason']} (latest {alarm['time']}, {alarm['source'] or '-'})")
        elif alarm["kind"] == "revalidation_due":
            lines.append(f"revalidation due: {alarm['reason']}")
    return lines


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.monitoring import METRIC_LABELS, assess
    from cytoedge.runtime.reports.monitor_chart import write_chart
    from cytoedge.runtime.run_log import default_run_log, read_revalidations, read_runs

    settings = {"baseline_runs": args.baseline, "recent_runs": args.recent, "revalidate_days": args.revalidate_days}
    policy = MonitorPolicy(**{k: v for k, v in settings.items() if v is not None})
    path = args.run_log if args.run_log is not None else default_run_log()
    runs, revalidations = read_runs(path), read_revalidations(path)
    report = assess(runs, revalidations, datetime.now(timezone.utc), policy)
    if args.chart is not None:
        write_chart(report, args.chart)
    if args.json:
        print(json.dumps({"run_log": str(path), **report.to_dict(),
                          "chart": str(args.chart) if args.chart is not None else None}, indent=1))
        return 1 if report.alarm else 0
    if not report.rows:
        print(f"run log {path}: no slides logged yet")
    else:
        last = report.rows[-1]
        print(f"run log {path}: {len(report.rows)} slides of {last.get('model') or '?'} (bundle "
              f"{(last.get('bundle_sha256') or '?')[:12]}), {report.rows[0]['time']} to {last['time']}"
              + (f"; {report.other_bundle_rows} slides of other bundles not judged" if report.other_bundle_rows
                 else ""))
        print("\n".join(run_lines(report) if args.runs else day_lines(report.days)))
        baseline = report.to_dict()["baseline"]
        parts = []
        for m, b in baseline.items():
            fmt = (lambda v: f"{v:.2f}") if m == "domain_ratio" else (lambda v: f"{v:.1%}")
            parts.append(f"{METRIC_LABELS[m]} {fmt(b['mean'])} ± {fmt(b['sd'])}" if b else
                         f"{METRIC_LABELS[m]} not judged yet (a baseline needs {policy.baseline_runs} slides)")
        print("baseline at the last slide (mean ± SD): " + "; ".join(parts))
    if report.alarm:
        print("ALARM:")
        for line in alarm_lines(report.alarms):
            print(f"  {line}")
    else:
        reval = report.revalidation
        judged = (f"no rule broken on the last {policy.recent_runs} slides, no domain drift" if report.rows
                  else "no slides to judge yet")
        print(f"no alarm: {judged}; last revalidation {reval['days_since']:.0f} days ago (due after "
              f"{policy.revalidate_days:g})")
    if args.chart is not None:
        print(f"chart: {args.chart}")
    return 1 if report.alarm else 0
