"""A self-contained HTML report of one slide (images inlined as base64 PNG, no external files)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np

TRIAGE_COLOURS = {"routine": "#2a7", "review": "#d90", "urgent": "#c22"}


def _jpeg_img(jpeg: bytes, alt: str, side: int) -> str:
    return (f'<img alt="{html.escape(alt)}" width="{side}" height="{side}" '
            f'src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">')


def _img(rgb: np.ndarray | None, alt: str, width: str = "100%") -> str:
    if rgb is None:
        return ""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        return ""
    return (f'<img alt="{html.escape(alt)}" style="max-width:{width}" '
            f'src="data:image/png;base64,{base64.b64encode(buf.tobytes()).decode()}">')


def _fmt_share(percent: float | None, interval: list | None) -> str:
    return "–" if percent is None else f"{percent:.1f} ({interval[0]:.1f}–{interval[1]:.1f})"


def _fmt(p: float | None) -> str:
    return "" if p is None else f"{p:.3f}"


class Markup(str):
    """A table cell's HTML, inserted as is (everything else is escaped)."""


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{v if isinstance(v, Markup) else html.escape(str(v))}</td>" for v in r)
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def density_rgb(grid: list[list[int]], side: int = 320) -> np.ndarray:
    g = np.asarray(grid, np.float32)
    v = (g / g.max() * 255).astype(np.uint8) if g.size and g.max() > 0 else np.zeros_like(g, np.uint8)
    heat = cv2.applyColorMap(v, cv2.COLORMAP_INFERNO)[..., ::-1]
    h, w = g.shape
    f = side / max(h, w)
    return cv2.resize(heat, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_NEAREST)


def render_html(entry: dict, audit: dict, overlay_rgb: np.ndarray | None, gallery_rgb: np.ndarray | None,
                views: dict | None = None, review_href: str | None = None) -> str:
    """The report; ``views`` (the scorer's cell views) put a picture beside each abnormal cell, and
    ``review_href`` links the slide's review page."""
    views = views or {}
    s = entry.get("summary") or {}
    tri = s.get("triage", {"level": "error", "reasons": [entry.get("error", "")]})
    colour = TRIAGE_COLOURS.get(tri["level"], "#555")
    counts = s.get("counts", {})
    diff = s.get("differential", {})
    by_class = s.get("by_class", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cytoedge — {html.escape(entry['source'])}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.tri{color:#fff;padding:4px 10px;"
        "border-radius:4px;display:inline-block}</style></head><body>",
        f"<h1>{html.escape(entry['source'])}</h1>",
        f"<p><span class='tri' style='background:{colour}'>{html.escape(tri['level'].upper())}</span></p><ul>",
        *[f"<li>{html.escape(r)}</li>" for r in tri["reasons"]], "</ul>",
    ]
    if review_href:
        parts.append(f"<p><a href='{html.escape(review_href)}'><b>Review every cell</b></a> (grouped by class; "
                     "reclassify with the number keys; export the corrections)</p>")
    if entry.get("error"):
        parts.append(f"<p><b>Error:</b> {html.escape(entry['error'])}</p>")
    if s:
        scale = s.get("scale") or {}
        parts += [
            "<h2>Counts</h2>",
            _table([[k, v] for k, v in counts.items()] + [["scale µm/px", f"{scale.get('um_per_px')} ({scale.get('source')})"],
                                                          ["area mm²", s.get("area_mm2")]], ["", ""]),
            "<h2>Differential</h2>",
            _table([[c, by_class.get(c, 0), f"{v:.1%}"] for c, v in diff.items()], ["class", "cells", "share"]),
        ]
        abn = s.get("abnormal_cells", [])
        if abn:
            parts += ["<h2>Abnormal cells</h2>",
                      _table([[Markup(_jpeg_img(views[a["id"]].jpeg, f"cell {a['id']}", 64)) if a["id"] in views else "",
                               a["id"], a["class"], _fmt(a.get("abnormal_probability")), _fmt(a["probability"]),
                               a["centre"], a.get("field", "")] for a in abn],
                             ["cell", "id", "class", "P(abnormal)", "P(class)", "centre (px)", "field"])]
        red = s.get("red_cells")
        if red:
            parts += [f"<h2>Red cells ({red['red_cells_classified']} classified"
                      f"{', provisional' if red['provisional'] else ''}; {red['model']})</h2>",
                      _table([[f, g["count"], f"{g['percent']:.1f}",
                               "–".join(f"{v:.1f}" for v in g["ci95_percent"] or []),
                               _fmt_share(g.get("adjusted_percent"), g.get("adjusted_ci95_percent")), g["grade"]]
                              for f, g in red["grades"].items()],
                             ["feature (ICSH 2015)", "cells called", "% called", "95 % interval",
                              "% corrected (95 % interval)", "grade"]),
                      f"<p><small>graded on: {html.escape(red.get('shares', 'called counts'))}; the corrected share "
                      "undoes the model's known confusions (e.g. spherocytes called schistocytes); "
                      f"size features: {html.escape(red['size_features'])}</small></p>"]
        dm = s.get("density_map")
        if dm:
            parts += [f"<h2>Abnormal-cell density ({dm['bin_um']:.0f} µm bins)</h2>",
                      _img(density_rgb(dm["abnormal"]), "abnormal density", "320px")]
    parts += ["<h2>Overlay</h2><p>red: abnormal, orange: anomalous, yellow: uncertain, green: other</p>",
              _img(overlay_rgb, "overlay"),
              "<h2>Flagged cells</h2><p>left: the cell as scanned; right: where the predicted class explains the "
              "pixels better (red) or the runner-up does (blue), inside the cell</p>", _img(gallery_rgb, "gallery") or "<p>none</p>",
              "<h2>Audit</h2>", _table([[k, v] for k, v in audit.items()], ["", ""]),
              "<p><small>Research software: a decision aid, not a diagnosis.</small></p></body></html>"]
    return "\n".join(parts)


def write_html(text: str, path: Path) -> Path:
    path.write_text(text)
    return path
