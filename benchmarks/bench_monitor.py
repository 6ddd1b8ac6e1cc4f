"""How often `cytoedge monitor`'s control rules fire on a steady lab: false alarms on simulated run logs.

Each trial is 60 slides of 100–300 white cells whose abnormal rate is constant (binomial counts); the
monitor's chart (runtime/monitoring.control_chart, a rolling 20-slide baseline) judges them, and a trial
alarms when any slide of the last 20 breaks a rule. Reported per rate: the share of trials that alarm,
and which rules fired. A steady log should rarely alarm; this says how rarely, for one metric.

    python benchmarks/bench_monitor.py --trials 300 --write
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from cytoedge.runtime.monitoring import RULES, MonitorPolicy, control_chart

    policy = MonitorPolicy()
    rng = np.random.default_rng(args.seed)
    rows = []
    for rate in (0.02, 0.05, 0.10):
        alarms, fired = 0, {r: 0 for r in RULES}
        for _ in range(args.trials):
            n = rng.integers(100, 301, 60)
            chart = control_chart(rng.binomial(n, rate) / n, policy.baseline_runs, RULES, trials=n)
            recent = chart.broken[-policy.recent_runs:]
            alarms += any(recent)
            for broken in recent:
                for r in broken:
                    fired[r] += 1
        rows.append(f"| {rate:.0%} | {alarms / args.trials:.1%} | " + ", ".join(f"{r} {k}" for r, k in fired.items() if k)
                    + " |")
    body = (f"{args.trials} simulated steady logs per rate (60 slides of 100–300 cells, constant abnormal rate, "
            f"seed {args.seed}); baseline {policy.baseline_runs} slides, alarms counted on the last "
            f"{policy.recent_runs}; one metric.\n\n| abnormal rate | logs that alarm | rules fired (slide-rule hits) |\n"
            "|---|---|---|\n" + "\n".join(rows))
    print(body)
    if args.write:
        write_section("monitor-false-alarms", "Monitor: false alarms on steady run logs (simulated)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
