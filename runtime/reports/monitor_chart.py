"""The monitor's PNG: one Levey–Jennings panel per metric, drawn with OpenCV.

OpenCV is a core dependency (matplotlib is only in the optional ``bench`` extra), so the chart is
always there where the monitor runs. Each panel shows the slides in log order, the rolling
baseline's mean and its ±2 SD and ±3 SD limits as they were when each slide was judged, slides
still forming a baseline in grey, and slides that broke a rule in red with the rule's name.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.monitoring import METRICS, RULES, MonitorReport

WIDTH, PANEL_H, HEADER_H, FOOTER_H = 1400, 290, 92, 40
LEFT, RIGHT, TOP, BOTTOM = 96, 36, 38, 46  # plot margins inside a panel
FONT = cv2.FONT_HERSHEY_SIMPLEX
BLACK, GREY, LIGHT, WHITE = (30, 30, 30), (150, 150, 150), (238, 238, 238), (255, 255, 255)
BLUE, GREEN, ORANGE, RED, SHADE = (200, 110, 30), (60, 150, 40), (0, 140, 245), (40, 40, 215), (246, 240, 232)
PANEL_TITLES = {"abnormal_rate": "abnormal rate (share of a slide's cells flagged abnormal)",
                "escalation_rate": "escalation rate (share flagged abnormal, uncertain or anomalous: to review)",
                "domain_ratio": "out-of-domain statistic (slide shift / its threshold; 1 = the slide's own alarm)"}


def _text(img: np.ndarray, text: str, xy: tuple[int, int], scale: float = 0.5, colour=BLACK, thick: int = 1,
          anchor: str = "left") -> None:
    (w, h), _ = cv2.getTextSize(text, FONT, scale, thick)
    x, y = xy
    x = {"left": x, "centre": x - w // 2, "right": x - w}[anchor]
    cv2.putText(img, text, (int(x), int(y)), FONT, scale, colour, thick, cv2.LINE_AA)


def _dashed(img: np.ndarray, p0: tuple[int, int], p1: tuple[int, int], colour, dash: int = 7) -> None:
    length = math.hypot(p1[0] - p0[0], p1[1] - p0[1])
    steps = max(1, int(length // dash))
    for k in range(0, steps, 2):
        a, b = k / steps, min((k + 1) / steps, 1.0)
        q0 = (int(p0[0] + (p1[0] - p0[0]) * a), int(p0[1] + (p1[1] - p0[1]) * a))
        q1 = (int(p0[0] + (p1[0] - p0[0]) * b), int(p0[1] + (p1[1] - p0[1]) * b))
        cv2.line(img, q0, q1, colour, 1, cv2.LINE_AA)


def _nice_ticks(lo: float, hi: float, count: int = 5) -> np.ndarray:
    step = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 1.0
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    return np.arange(math.ceil(lo / step) * step, hi + step * 1e-9, step)


def _label(metric: str, value: float) -> str:
    return f"{value:.1%}" if metric != "domain_ratio" else f"{value:.2f}"


def _step_line(img, xs, ys, ok, colour, dashed: bool = False, thick: int = 1) -> None:
    """A line through the limits as they stood for each judged slide (held flat across each slide's width);
    ``ok``: the slides that have a limit inside the plot."""
    half = (xs[1] - xs[0]) / 2 if len(xs) > 1 else 4
    for i in range(len(xs)):
        if not ok[i]:
            continue
        p0, p1 = (int(xs[i] - half), int(ys[i])), (int(xs[i] + half), int(ys[i]))
        if dashed:
            _dashed(img, p0, p1, colour, 5)
        else:
            cv2.line(img, p0, p1, colour, thick, cv2.LINE_AA)
        if i + 1 < len(xs) and ok[i + 1] and not dashed:
            cv2.line(img, p1, (p1[0], int(ys[i + 1])), colour, thick, cv2.LINE_AA)


def _rule_labels(img: np.ndarray, broken: list[tuple[str, ...]], valued: np.ndarray, xs: np.ndarray, top: int,
                 right: int) -> None:
    """Above each run of consecutive rule-breaking slides, in the band at the panel's top, the rules it broke
    (on one of three rows; a label with no room left is dropped — the red points stay)."""
    runs: list[tuple[int, set[str]]] = []
    previous = False
    for i in np.flatnonzero(valued):
        if broken[i]:
            if previous:
                runs[-1][1].update(broken[i])
            else:
                runs.append((i, set(broken[i])))
        previous = bool(broken[i])
    ends = [-1e9] * 3  # right end of the last label on each row
    for i, rules in runs:
        text = " ".join(r for r in RULES if r in rules)
        w = cv2.getTextSize(text, FONT, 0.42, 1)[0][0]
        x = min(int(xs[i]) - 6, right - w - 4)
        row = next((k for k, end in enumerate(ends) if x > end + 8), None)
        if row is not None:
            _text(img, text, (x, top + 15 + 15 * row), 0.42, RED)
            ends[row] = x + w


def _panel(report: MonitorReport, metric: str) -> np.ndarray:
    chart = report.charts[metric]
    img = np.full((PANEL_H, WIDTH, 3), WHITE, np.uint8)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, PANEL_H - BOTTOM
    _text(img, PANEL_TITLES[metric], (x0, 24), 0.58, BLACK, 1)
    n = len(chart.values)
    finite = np.isfinite(chart.values)
    if not finite.any():
        cv2.rectangle(img, (x0, y0), (x1, y1), GREY, 1)
        _text(img, "no values logged", ((x0 + x1) // 2, (y0 + y1) // 2), 0.6, GREY, anchor="centre")
        return img
    judged = np.isfinite(chart.centre)
    bounds = [chart.values[finite]]
    for k in (-3, 3):
        bounds.append((chart.centre + k * np.minimum(chart.sd, 1e9))[judged])
    if metric == "domain_ratio":
        bounds.append(np.array([1.0]))
    allv = np.concatenate(bounds)
    allv = allv[np.isfinite(allv)]
    lo, hi = float(allv.min()), float(allv.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    span = hi - lo
    lo, hi = lo - 0.06 * span, hi + (0.3 if any(chart.broken) else 0.08) * span  # a band for the rules' names
    lo = max(lo, 0.0)  # every metric is a share or a length: a limit below 0 is not drawn

    def x_of(i):
        return x0 + (i + 0.5) * (x1 - x0) / max(n, 1)

    def y_of(v):
        return y1 - (np.clip(v, lo, hi) - lo) / (hi - lo) * (y1 - y0)

    def inside(v):
        return judged & (v >= lo) & (v <= hi)

    recent = max(0, n - report.policy.recent_runs)
    cv2.rectangle(img, (int(x_of(recent) - (x1 - x0) / max(n, 1) / 2), y0), (x1, y1), SHADE, -1)
    for t in _nice_ticks(lo, hi):
        yt = int(y_of(t))
        cv2.line(img, (x0, yt), (x1, yt), LIGHT, 1)
        _text(img, _label(metric, t), (x0 - 8, yt + 5), 0.45, BLACK, anchor="right")
    xs = np.array([x_of(i) for i in range(n)])
    tick_every = max(1, int(math.ceil(n / 12)))
    for i in range(0, n, tick_every):
        cv2.line(img, (int(xs[i]), y1), (int(xs[i]), y1 + 5), BLACK, 1)
        _text(img, str(i + 1), (int(xs[i]), y1 + 19), 0.42, BLACK, anchor="centre")
        _text(img, report.rows[i]["time"][5:10], (int(xs[i]), y1 + 36), 0.38, GREY, anchor="centre")
    for i in report.restarts:
        xr = int(xs[i] - (xs[1] - xs[0]) / 2 if n > 1 else xs[i])
        _dashed(img, (xr, y0), (xr, y1), BLACK, 4)
        _text(img, "revalidated: new baseline", (xr + 4, y0 + 14), 0.4, BLACK)
    if metric == "domain_ratio":
        _dashed(img, (x0, int(y_of(1.0))), (x1, int(y_of(1.0))), RED, 10)
        _text(img, "slide alarm", (x0 + 6, int(y_of(1.0)) - 5), 0.4, RED)
    with np.errstate(invalid="ignore"):
        for k, colour, dashed in ((3, RED, False), (2, ORANGE, True)):
            for sign in (-1, 1):
                limit = chart.centre + sign * k * np.minimum(chart.sd, 1e9)
                _step_line(img, xs, y_of(limit), inside(limit), colour, dashed)
        _step_line(img, xs, y_of(chart.centre), inside(chart.centre), GREEN, thick=2)
    pts = [(int(xs[i]), int(y_of(chart.values[i]))) for i in range(n) if finite[i]]
    if len(pts) > 1:
        cv2.polylines(img, [np.array(pts, np.int32)], False, GREY, 1, cv2.LINE_AA)
    radius = 4 if n <= 120 else 2
    for i in np.flatnonzero(finite):
        p = (int(xs[i]), int(y_of(chart.values[i])))
        if chart.broken[i]:
            cv2.circle(img, p, radius + 3, RED, -1, cv2.LINE_AA)
            cv2.circle(img, p, radius + 6, RED, 1, cv2.LINE_AA)
        elif judged[i]:
            cv2.circle(img, p, radius, BLUE, -1, cv2.LINE_AA)
        else:
            cv2.circle(img, p, radius, GREY, 1, cv2.LINE_AA)
    _rule_labels(img, chart.broken, finite, xs, y0, x1)
    cv2.rectangle(img, (x0, y0), (x1, y1), BLACK, 1)
    return img


def _header(report: MonitorReport) -> np.ndarray:
    img = np.full((HEADER_H, WIDTH, 3), WHITE, np.uint8)
    last = report.rows[-1] if report.rows else {}
    sha = (last.get("bundle_sha256") or "?")[:12]
    verdict = "ALARM" if report.alarm else "no alarm"
    _text(img, f"cytoedge monitor: {last.get('model') or '?'} (bundle {sha}), {len(report.rows)} slides", (LEFT, 30),
          0.75, BLACK, 2)
    _text(img, verdict, (WIDTH - RIGHT, 30), 0.75, RED if report.alarm else GREEN, 2, anchor="right")
    reval = report.revalidation
    reval_text = (f"last revalidation {reval['last'][:10]} ({reval['days_since']:.0f} days ago)" if reval["last"]
                  else "never revalidated")
    _text(img, f"baseline: the {report.policy.baseline_runs} slides before each one (rule breakers left out); "
               f"alarms count on the last {report.policy.recent_runs} slides (shaded); {reval_text}"
               f"{', DUE' if reval['due'] else ''}", (LEFT, 56), 0.48, RED if reval["due"] else BLACK)
    x = LEFT
    legend = (("mean", GREEN, "line"), ("+/-2 SD", ORANGE, "dash"), ("+/-3 SD", RED, "line"),
              ("slide judged", BLUE, "dot"), ("in a baseline", GREY, "ring"), ("rule broken", RED, "alarm"))
    for name, colour, kind in legend:
        y = 78
        if kind == "line":
            cv2.line(img, (x, y), (x + 26, y), colour, 2, cv2.LINE_AA)
        elif kind == "dash":
            _dashed(img, (x, y), (x + 26, y), colour, 5)
        elif kind == "dot":
            cv2.circle(img, (x + 13, y), 4, colour, -1, cv2.LINE_AA)
        elif kind == "ring":
            cv2.circle(img, (x + 13, y), 4, colour, 1, cv2.LINE_AA)
        else:
            cv2.circle(img, (x + 13, y), 7, colour, -1, cv2.LINE_AA)
        _text(img, name, (x + 34, y + 5), 0.45)
        x += 60 + cv2.getTextSize(name, FONT, 0.45, 1)[0][0]
    return img


def chart_image(report: MonitorReport) -> np.ndarray:
    """The whole chart as a BGR image (header, one panel per metric, the x axis's name)."""
    footer = np.full((FOOTER_H, WIDTH, 3), WHITE, np.uint8)
    _text(footer, "slide in the run log, oldest to newest (number; month-day below, UTC)", (WIDTH // 2, 22), 0.5,
          anchor="centre")
    return np.vstack([_header(report), *(_panel(report, m) for m in METRICS), footer])


def write_chart(report: MonitorReport, path: Path) -> Path:
    """Write the chart as PNG to ``path`` (its folder is made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), chart_image(report)):
        raise OSError(f"{path}: the chart could not be written (OpenCV refused the file name or folder)")
    return path
