"""Overlay (boxes on the slide thumbnail, coloured by flag) and the gallery of flagged cells
(crop | counterfactual heatmap, labelled with class, runner-up and probability)."""
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


def heatmap_rgb(m: np.ndarray, size: int) -> np.ndarray:
    """Diverging map: red where the predicted class explains the pixels better, blue where the runner-up does."""
    scale = float(np.abs(m).max()) or 1.0
    v = np.clip(m / scale, -1, 1)
    rgb = np.empty(m.shape + (3,), np.float32)
    rgb[..., 0] = 255 * np.where(v > 0, 1.0, 1.0 + v)
    rgb[..., 2] = 255 * np.where(v < 0, 1.0, 1.0 - v)
    rgb[..., 1] = 255 * (1.0 - np.abs(v))
    return cv2.resize(rgb.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)


def gallery(cells: list[dict], crops: dict[int, np.ndarray], heatmaps: dict[int, np.ndarray], per_row: int = 4
            ) -> np.ndarray | None:
    """One panel per flagged cell with a kept crop: crop, heatmap (if any), caption."""
    panels = []
    for c in cells:
        crop = crops.get(c["id"])
        if crop is None:
            continue
        side = crop.shape[0]
        hm = heatmaps.get(c["id"])
        right = heatmap_rgb(hm, side) if hm is not None else np.full_like(crop, 255)
        panel = np.full((side + 30, 2 * side + 4, 3), 255, np.uint8)
        panel[:side, :side] = crop
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
