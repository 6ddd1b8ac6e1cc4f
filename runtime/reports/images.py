"""Overlay (boxes on the slide thumbnail, coloured by flag) and the gallery of flagged cells
(the cell as scanned | the same with its counterfactual heatmap, labelled with class, runner-up and probability)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

COLOURS = {"abnormal": (220, 30, 30), "anomalous": (230, 140, 0), "uncertain": (240, 200, 0), "ok": (30, 160, 60)}


def flag_of(cell: dict) -> str:
    flags = cell["flags"]
    for key in ("abnormal", "anomalous", "uncertain"):
        if flags.get(key):
            return key
    return "ok"


def overlay(thumbnail: np.ndarray, scale: float, cells: list[dict]) -> np.ndarray:
    """RGB thumbnail with one box per cell (source boxes × ``scale``) and a short label."""
    img = thumbnail.copy()
    thick = max(1, round(max(img.shape[:2]) / 800))
    for c in cells:
        x0, y0, x1, y1 = (int(round(v * scale)) for v in c["bbox"])
        colour = COLOURS[flag_of(c)]
        cv2.rectangle(img, (x0, y0), (x1, y1), colour, thick)
        if x1 - x0 >= 24:
            cv2.putText(img, f"{c['id']}:{c['class'][:4]}", (x0, max(y0 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                        0.35 * thick, colour, thick, cv2.LINE_AA)
    return img


def on_view(view_rgb: np.ndarray, overlay_png: bytes | None) -> np.ndarray:
    """The cell's view with its heatmap overlay (RGBA PNG) blended on, or the view itself."""
    if overlay_png is None:
        return view_rgb
    rgba = cv2.cvtColor(cv2.imdecode(np.frombuffer(overlay_png, np.uint8), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGRA2RGBA)
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return (view_rgb * (1 - a) + rgba[..., :3] * a).round().astype(np.uint8)


def gallery(cells: list[dict], views: dict, overlays: dict[int, bytes], per_row: int = 4, side: int = 128
            ) -> np.ndarray | None:
    """One panel per cell with a kept view: the cell as scanned, the same with its heatmap (if any), caption."""
    panels = []
    for c in cells:
        view = views.get(c["id"])
        if view is None:
            continue
        rgb = view.rgb()
        left = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA if rgb.shape[0] > side else cv2.INTER_CUBIC)
        right = cv2.resize(on_view(rgb, overlays.get(c["id"])), (side, side),
                           interpolation=cv2.INTER_AREA if rgb.shape[0] > side else cv2.INTER_CUBIC)
        panel = np.full((side + 30, 2 * side + 4, 3), 255, np.uint8)
        panel[:side, :side] = left
        panel[:side, side + 4:] = right
        p = (c.get("probabilities") or {}).get(c["class"])
        text1 = f"#{c['id']} {c['class']}" + (f" {p:.2f}" if p is not None else "")
        text2 = f"vs {c.get('runner_up', '')} [{flag_of(c)}]"
        cv2.putText(panel, text1, (2, side + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(panel, text2, (2, side + 26), cv2.FONT_HERSHEY_SIMPLEX, 0.38, COLOURS[flag_of(c)], 1, cv2.LINE_AA)
        panels.append(panel)
    if not panels:
        return None
    h, w = panels[0].shape[:2]
    rows = -(-len(panels) // per_row)
    sheet = np.full((rows * (h + 6), min(per_row, len(panels)) * (w + 6), 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        r, c = divmod(k, per_row)
        sheet[r * (h + 6):r * (h + 6) + h, c * (w + 6):c * (w + 6) + w] = panel
    return sheet


def write_png(rgb: np.ndarray, path: Path) -> Path:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: could not write PNG")
    return path
