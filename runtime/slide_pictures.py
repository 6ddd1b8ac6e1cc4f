"""What a slide leaves for the local reports besides its records: the thumbnail the overlay is drawn on,
each cell's view as scanned, and the heatmaps of the cells explained.

None of it reaches a record or the summary (so a slide continued from a checkpoint has the same
results without it); it feeds overlay.png, gallery.png, review.html and report.html.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cytoedge.runtime.cell_views import CellView
from cytoedge.runtime.source_tiles import Tile


class SlideThumbnail:
    """A thumbnail within ``limit_px`` of the slide's tile cores. Streamed tiles grow the slide as they
    come, so what was drawn is shrunk onto a larger canvas when they do, rather than dropped."""

    def __init__(self, limit_px: int):
        self.limit_px = limit_px
        self.image: np.ndarray | None = None
        self.scale = 1.0  # thumbnail pixels per slide pixel

    def draw(self, tile: Tile, width: int, height: int) -> None:
        """Draw ``tile``'s core on a slide now ``width × height`` slide pixels."""
        if not width or not height:
            return
        self._fit(width, height)
        s = self.scale
        cx0, cy0, cx1, cy1 = tile.core
        tx0, ty0 = int(cx0 * s), int(cy0 * s)
        tx1 = min(max(tx0 + 1, int(round(cx1 * s))), self.image.shape[1])
        ty1 = min(max(ty0 + 1, int(round(cy1 * s))), self.image.shape[0])
        if tx1 <= tx0 or ty1 <= ty0:
            return
        core = tile.rgb[cy0 - tile.y0:cy1 - tile.y0, cx0 - tile.x0:cx1 - tile.x0]
        self.image[ty0:ty1, tx0:tx1] = cv2.resize(core, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)

    def _fit(self, width: int, height: int) -> None:
        scale = min(1.0, self.limit_px / max(width, height))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)), 3)
        if self.image is not None and self.image.shape == shape:
            return
        canvas = np.full(shape, 255, np.uint8)
        if self.image is not None:
            old = self.image
            f = scale / self.scale
            h, w = min(shape[0], max(1, round(old.shape[0] * f))), min(shape[1], max(1, round(old.shape[1] * f)))
            canvas[:h, :w] = cv2.resize(old, (w, h), interpolation=cv2.INTER_AREA)
        self.image, self.scale = canvas, scale


@dataclass
class SlidePictures:
    """The slide's pictures: thumbnail (None for a folder, whose fields have their own coordinates), the
    first ``review_cells`` cells' views, and the explained cells' heatmaps and overlays by cell id."""

    thumbnail: SlideThumbnail | None
    views: dict[int, CellView] = field(default_factory=dict)
    explained: set[int] = field(default_factory=set)  # cells given a heatmap (or their turn, without a plan)
    heatmaps: dict[int, np.ndarray] = field(default_factory=dict)  # [S, S] maps, model input frame
    overlays: dict[int, bytes] = field(default_factory=dict)  # RGBA PNG of each map on its cell's view
