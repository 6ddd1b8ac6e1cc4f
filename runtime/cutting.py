"""The cut stage: a tile's white cells as rows on its model-scale image, batched for the estimator.

A tile (stain-mapped by the slide's map) is resampled to the model's pixel scale once; each cell is a
row of the kernels' cell table on it (centre on the model input's pixel lattice), so the kernels cut
every view of a cell from that one image (``CellBatch.inputs``). With per-cell stain maps each cell's
PBC-sized field is mapped and resampled on its own, and becomes its own small tile.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cytoedge.kernels import cell_table
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cell_views import CellView
from cytoedge.runtime.cells import CellBatch, on_input_lattice, to_model_scale
from cytoedge.runtime.detection import Detection
from cytoedge.runtime.slide_stain import SlideStain
from cytoedge.runtime.source_tiles import Tile


@dataclass
class PendingCells:
    """Cells cut but not yet classified: model-scale tiles, their rows, each cell's place and view."""

    tiles: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    views: list[CellView | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.meta)

    def batch(self) -> CellBatch:
        return CellBatch(self.tiles, np.stack(self.rows))


def cell_meta(d: Detection, tile: Tile) -> dict:
    """A cell's place on the slide (slide pixels), its field and its nucleus area."""
    x0, y0, x1, y1 = d.bbox
    return {
        "bbox": [round(x0 + tile.x0, 1), round(y0 + tile.y0, 1), round(x1 + tile.x0, 1), round(y1 + tile.y0, 1)],
        "centre": [round(d.cx + tile.x0, 1), round(d.cy + tile.y0, 1)],
        "field": tile.field,
        "nucleus_area_um2": round(d.nucleus_area_um2, 2),
    }


class CellCutter:
    """Adds a tile's cells to a :class:`PendingCells`; counts what it resampled (per-stage counts)."""

    def __init__(self, bundle: ModelBundle, stain: SlideStain | None, stain_field_um: float):
        self.bundle, self.stain, self.stain_field_um = bundle, stain, stain_field_um
        self.tiles_resampled = 0

    def add(self, tile: Tile, white: list[Detection], um_per_px: float, pending: PendingCells,
            views: list[CellView | None], slide: str, tick: Callable[[str, float], float]) -> None:
        """Add ``white`` (the cells ``tile`` owns) with their ``views``; ``tick(stage, since)`` times the
        "stain" and "resample" stages (per-cell fields count as stain)."""
        t = time.perf_counter()
        if self.stain is not None and self.stain.context == "cell":
            self._add_fields(tile, white, um_per_px, pending)
            tick("stain", t)
        else:
            rgb = self.stain.tile(tile.rgb, slide) if self.stain is not None else tile.rgb
            t = tick("stain", t)
            self._add_cells(len(pending.tiles), to_model_scale(rgb, um_per_px, self.bundle), rgb.shape[1],
                            [(d.cx, d.cy) for d in white], pending)
            pending.meta.extend(cell_meta(d, tile) for d in white)
            tick("resample", t)
        pending.views.extend(views)

    def _add_cells(self, index: int, model_tile: np.ndarray, source_width: int,
                   centres: list[tuple[float, float]], pending: PendingCells) -> None:
        f = model_tile.shape[1] / source_width
        size = self.bundle.input_size
        pending.tiles.append(model_tile)
        self.tiles_resampled += 1
        for cx, cy in centres:
            pending.rows.append(cell_table(index, on_input_lattice((cx + 0.5) * f - 0.5, size),
                                           on_input_lattice((cy + 0.5) * f - 0.5, size))[0])

    def _add_fields(self, tile: Tile, white: list[Detection], um_per_px: float, pending: PendingCells) -> None:
        """Per-cell maps: the references come from PBC crops (one white cell centred in a ~36 µm field),
        so each cell is matched on a field of that size around it. Independent of tiling, as the overlap
        exceeds half the field."""
        half = self.stain_field_um / 2 / um_per_px
        h, w = tile.rgb.shape[:2]
        for d in white:
            x0, y0 = int(max(round(d.cx - half), 0)), int(max(round(d.cy - half), 0))
            x1, y1 = int(min(round(d.cx + half) + 1, w)), int(min(round(d.cy + half) + 1, h))
            rgb = self.stain.field(tile.rgb[y0:y1, x0:x1])
            self._add_cells(len(pending.tiles), to_model_scale(rgb, um_per_px, self.bundle), rgb.shape[1],
                            [(d.cx - x0, d.cy - y0)], pending)
            pending.meta.append(cell_meta(d, tile))
