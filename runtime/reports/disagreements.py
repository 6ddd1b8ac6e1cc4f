"""The disagreement gallery of `cytoedge compare`: each cell the reader and the model call differently,
from its own pixels, in a self-contained HTML page (images inlined, no script, no CDN) and a PNG
contact sheet.

A slide's cell is cut from its source at the cell's box (runtime/sources.py), a crop shown whole, so
the reviewer of a pilot sees what the reader saw rather than the 32-px model input. Sources are opened
one at a time and only the capped number of cells is kept, so memory is bounded by one field (or a
DICOM's frame cache) and the gallery, whatever the size of the pilot. A source that is no longer
where the results say is not an error: its cells get a placeholder that says so.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.compare_inputs import ModelCall
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.reports.html import _img, _table

SIDE = 128  # px: a cell's image is fitted into SIDE × SIDE
PANEL_W, CAPTION_H, GAP = 176, 46, 6
MARGIN = 0.15  # of the box's size, added around a slide cell's box for context


@dataclass
class GalleryCell:
    call: ModelCall
    label: str  # the reader's
    rgb: np.ndarray | None = None  # fitted into SIDE × SIDE; None: not found
    missing: str | None = None  # why there is no image

    @property
    def caption(self) -> str:
        p = f" (p={self.call.probability:.2f})" if self.call.probability is not None else ""
        return f"reader {self.label} / model {self.call.predicted}{p}"

    @property
    def where(self) -> str:
        if self.call.image is not None:
            return Path(self.call.image).name
        return f"{Path(self.call.slide).name} #{self.call.key[2]}"


def fit(rgb: np.ndarray, side: int = SIDE) -> np.ndarray:
    """``rgb`` scaled (aspect kept) into a white ``side`` × ``side`` square."""
    h, w = rgb.shape[:2]
    f = side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
    out = np.full((side, side, 3), 255, np.uint8)
    y, x = (side - size[1]) // 2, (side - size[0]) // 2
    out[y:y + size[1], x:x + size[0]] = small
    return out


def _region(source, bbox: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = bbox
    pad = MARGIN * max(x1 - x0, y1 - y0)
    xa, ya = max(int(np.floor(x0 - pad)), 0), max(int(np.floor(y0 - pad)), 0)
    xb, yb = min(int(np.ceil(x1 + pad)), source.width), min(int(np.ceil(y1 + pad)), source.height)
    if xb <= xa or yb <= ya:
        raise CytoedgeError(f"{source.name}: box {list(bbox)} lies outside the image")
    rgb, covered = source.read_region(xa, ya, xb, yb)
    if not covered:
        raise CytoedgeError(f"{source.name}: no frame covers box {list(bbox)}")
    return rgb


def load_images(cells: list[GalleryCell]) -> None:
    """Fill each cell's ``rgb`` (or ``missing``), reading each file once and one file at a time."""
    from cytoedge.runtime.cells import read_crop
    from cytoedge.runtime.sources import open_source

    by_file: dict[str, list[GalleryCell]] = {}
    for c in cells:
        by_file.setdefault(c.call.image or c.call.field or c.call.slide, []).append(c)
    for path, group in by_file.items():
        try:
            if group[0].call.image is not None:
                rgb = fit(read_crop(path))
                for c in group:
                    c.rgb = rgb
                continue
            source = open_source(path)
            if not hasattr(source, "read_region"):
                source.close()
                raise CytoedgeError(f"{path}: is a folder, and the results name no field file for its cells")
            try:
                for c in group:
                    try:
                        if c.call.bbox is None:
                            raise CytoedgeError(f"{path}: cell {c.call.key[2]} has no bbox in the results")
                        c.rgb = fit(_region(source, c.call.bbox))
                    except CytoedgeError as e:
                        c.missing = str(e)
            finally:
                source.close()
        except (CytoedgeError, OSError) as e:
            for c in group:
                c.missing = f"{e} (moved or deleted since the results were written?)" \
                    if not Path(path).exists() else str(e)


def _placeholder(side: int = SIDE) -> np.ndarray:
    out = np.full((side, side, 3), 225, np.uint8)
    for k, line in enumerate(("image", "not found")):
        cv2.putText(out, line, (10, side // 2 - 6 + 18 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (90, 90, 90), 1,
                    cv2.LINE_AA)
    return out


def _panel(cell: GalleryCell) -> np.ndarray:
    panel = np.full((SIDE + CAPTION_H, PANEL_W, 3), 255, np.uint8)
    x = (PANEL_W - SIDE) // 2
    panel[:SIDE, x:x + SIDE] = cell.rgb if cell.rgb is not None else _placeholder()
    p = f" p={cell.call.probability:.2f}" if cell.call.probability is not None else ""
    lines = [(f"reader {cell.label} /", (0, 110, 0)), (f"model {cell.call.predicted}{p}", (170, 0, 0)),
             (cell.where[-28:], (80, 80, 80))]
    for k, (text, colour) in enumerate(lines):
        cv2.putText(panel, text, (3, SIDE + 13 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.36, colour, 1, cv2.LINE_AA)
    return panel


def contact_sheet(cells: list[GalleryCell], per_row: int = 8) -> np.ndarray:
    """One captioned panel per cell (a white note where there is none)."""
    if not cells:
        sheet = np.full((60, 420, 3), 255, np.uint8)
        cv2.putText(sheet, "no disagreement between reader and model", (8, 35), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        return sheet
    h, w = SIDE + CAPTION_H, PANEL_W
    rows, cols = -(-len(cells) // per_row), min(per_row, len(cells))
    sheet = np.full((rows * (h + GAP), cols * (w + GAP), 3), 255, np.uint8)
    for k, cell in enumerate(cells):
        r, c = divmod(k, per_row)
        sheet[r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = _panel(cell)
    return sheet


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_html(report: dict, cells: list[GalleryCell]) -> str:
    """The comparison's figures and the gallery of disagreements, as one self-contained page."""
    a, match, gallery = report["agreement"], report["matching"], report["gallery"]
    names = a["confusion_matrix"]["rows_reader_cols_model"]
    k = a["kappa"]
    kappa = f"{_num(k['value'])} (95 % CI {_num(k['ci95'][0])} – {_num(k['ci95'][1])})"
    th = report["thresholds"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cytoedge compare: disagreements</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;"
        "margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}.cells{display:flex;"
        "flex-wrap:wrap;gap:8px}figure{margin:0;width:180px;font-size:12px}figure img{width:160px;height:160px;"
        "image-rendering:auto}.missing{color:#a40}.fail{color:#c22}.pass{color:#2a7}</style></head><body>",
        "<h1>Reader against model</h1>",
        f"<p>{match['matched']} cells labelled by the reader and called by the model "
        f"({match['results_unlabelled']} of the model's cells have no label; {match['labels_unmatched']} labels "
        f"match no result). Model {html.escape(str(report['model']))}, bundle "
        f"<code>{html.escape(str(report['bundle_sha256']))}</code>.</p>",
        _table([["accuracy", _num(a["accuracy"])], ["balanced accuracy", _num(a["balanced_accuracy"])],
                ["Cohen's κ", kappa]], ["measure", "value"]),
    ]
    if report["warnings"]:
        parts += ["<h2 class='missing'>Warnings</h2><ul>", *[f"<li>{html.escape(w)}</li>" for w in report["warnings"]],
                  "</ul>"]
    if th["failures"]:
        parts += ["<h2 class='fail'>Thresholds not met</h2><ul>",
                  *[f"<li>{html.escape(f)}</li>" for f in th["failures"]], "</ul>"]
    elif th["any_set"]:
        parts.append("<h2 class='pass'>All thresholds met</h2>")
    parts += ["<h2>Per class (reader = reference, one class against the rest)</h2>",
              _table([[n, v["reader"], v["model"], v["agreed"], _num(v["sensitivity"]), _num(v["specificity"])]
                      for n, v in a["per_class"].items()],
                     ["class", "reader", "model", "both", "sensitivity", "specificity"]),
              "<h2>Confusion matrix (rows reader, columns model)</h2>",
              _table([[n, *row] for n, row in zip(names, a["confusion_matrix"]["counts"])], ["", *names])]
    for slide in report["slides"]:
        parts += [f"<h2>Differential: {html.escape(slide['source'])}</h2>",
                  f"<p>{slide['reader_cells']} cells counted by the reader, {slide['model_cells']} by the model; "
                  "Rümke 95 % interval of the reader's count (exact binomial, CLSI H20-A2)</p>",
                  _table([[c, v["reader_count"], _pct(v["reader_percent"]),
                           f"{_pct(v['reader_rumke95_percent'][0])} – {_pct(v['reader_rumke95_percent'][1])}",
                           v["model_count"], _pct(v["model_percent"]), _pct(v["difference_pp"]),
                           {True: "yes", False: "NO", None: "–"}[v["model_inside"]]]
                          for c, v in slide["classes"].items()],
                         ["class", "reader", "reader %", "Rümke 95 %", "model", "model %", "difference pp",
                          "model inside"])]
    parts.append(f"<h2>Disagreements ({gallery['disagreements']}"
                 + (f", the first {gallery['shown']} shown" if gallery["shown"] < gallery["disagreements"] else "")
                 + ")</h2>")
    if gallery["missing_images"]:
        parts.append(f"<p class='missing'>{gallery['missing_images']} cell(s) could not be shown: their image is no "
                     "longer where the results say (placeholders below, with the reason).</p>")
    parts.append("<div class='cells'>" if cells else "<p>none</p>")
    for c in cells:
        img = _img(c.rgb, c.caption) if c.rgb is not None else _img(_placeholder(), "image not found")
        note = f"<br><span class='missing'>{html.escape(c.missing)}</span>" if c.missing else ""
        parts.append(f"<figure>{img}<figcaption>{html.escape(c.caption)}<br><small>{html.escape(c.where)}</small>"
                     f"{note}</figcaption></figure>")
    parts += ["</div>" if cells else "",
              "<p><small>Research software: a decision aid, not a diagnosis.</small></p></body></html>"]
    return "\n".join(parts)
