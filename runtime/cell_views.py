"""What a reviewer sees of each cell: the scanned pixels at source resolution, the cell's outline,
and its counterfactual heatmap drawn only inside the cell.

A cell's *view* is the model's field of view (``input_size × um_per_px`` of the bundle) around the
same centre the model was given, cut from the tile as read (before stain normalisation, so the
colours are the scanner's), at the source's own pixel size, capped at :data:`MAX_VIEW_PX` a side.
It is kept JPEG-encoded (a few kB), so a slide's thousands of cells fit in memory and in one HTML
file. Because the view and the model input cover the same square, the heatmap lies on it by a plain
resize.

The cell's mask is the convex hull of its nucleus (all lobes, from the detector) grown by
:data:`CYTOPLASM_UM`: the cytoplasm of the common white cells. (Cutting it to the stained
foreground was tried: a neutrophil's pale cytoplasm reads as plasma, and the mask shrank to the
nucleus.)
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cytoedge.runtime.detection import Detection

MAX_VIEW_PX = 256
JPEG_QUALITY = 90
# A white cell's cytoplasm reaches ~2–4 µm beyond its nucleus (neutrophil 12–15 µm across, nucleus
# ~8 µm): 3 µm holds the cell and little else.
CYTOPLASM_UM = 3.0


@dataclass(frozen=True)
class CellView:
    jpeg: bytes  # the view, RGB, JPEG-encoded
    side_px: int  # the view's side as kept (source pixels unless capped)
    source_px: int  # the view's side in source pixels
    mask: np.ndarray | None = None  # uint8 0/1 [side, side]: the cell; kept only while the cell may need it

    def without_mask(self) -> "CellView":
        return CellView(self.jpeg, self.side_px, self.source_px)

    def rgb(self) -> np.ndarray:
        return cv2.cvtColor(cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def view_side_px(bundle_fov_um: float, um_per_px: float) -> int:
    """Source pixels across the model's field of view."""
    return max(8, int(round(bundle_fov_um / um_per_px)))


def cut_cell_view(rgb: np.ndarray, det: Detection, side_px: int, um_per_px: float) -> CellView:
    """The view of one detected cell of tile ``rgb`` (tile pixels), with its mask."""
    half = side_px / 2
    m = np.float32([[1, 0, det.cx - half + 0.5], [0, 1, det.cy - half + 0.5]])
    crop = cv2.warpAffine(rgb, m, (side_px, side_px), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
    mask = np.zeros((side_px, side_px), np.uint8)
    if len(det.contour) >= 3:
        hull = cv2.convexHull((det.contour - (det.cx - half + 0.5, det.cy - half + 0.5)).astype(np.float32))
        cv2.fillPoly(mask, [np.round(hull).astype(np.int32)], 1)
        r = max(1, int(round(CYTOPLASM_UM / um_per_px)))
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    else:  # no outline (a restored or hand-made detection): the detector's box
        x0, y0, x1, y1 = (int(round(v)) for v in (det.bbox[0] - det.cx + half, det.bbox[1] - det.cy + half,
                                                  det.bbox[2] - det.cx + half, det.bbox[3] - det.cy + half))
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    side = side_px
    if side_px > MAX_VIEW_PX:
        side = MAX_VIEW_PX
        crop = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError("JPEG encoding of a cell view failed")
    return CellView(buf.tobytes(), side, side_px, mask)


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive evidence (the pixels arguing for the predicted class) that lies in
    the cell: the map is resized onto the view's mask."""
    m = cv2.resize(heatmap.astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    pos = np.maximum(m, 0.0)
    total = float(pos.sum())
    return float((pos * (mask > 0)).sum() / total) if total > 0 else 0.0


def heatmap_overlay(heatmap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGBA ``[side, side, 4]`` uint8 overlay: red where the predicted class explains the pixels better,
    blue where the runner-up does, opacity by strength, transparent outside the cell."""
    m = cv2.resize(heatmap.astype(np.float32), mask.shape[::-1], interpolation=cv2.INTER_LINEAR)
    inside = mask > 0
    scale = float(np.abs(m[inside]).max()) if inside.any() else 0.0
    v = np.clip(m / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(m)
    rgba = np.zeros(m.shape + (4,), np.uint8)
    rgba[..., 0] = np.where(v > 0, 230, 30)
    rgba[..., 1] = 40
    rgba[..., 2] = np.where(v > 0, 30, 230)
    rgba[..., 3] = np.where(inside, np.round(200 * np.abs(v)), 0).astype(np.uint8)
    return rgba


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an RGB or RGBA uint8 image."""
    code = cv2.COLOR_RGBA2BGRA if image.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, code))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()
