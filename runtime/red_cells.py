"""A slide's red cells read by a red-cell bundle: a sample of separated red cells from each tile's core,
classified by the same estimator and calibration machinery as white cells, counted and graded.

A stage of its own beside the white-cell scorer, which calls it once per tile: the sample is spread over
the slide (each tile gives at most twice its share of ``target_cells`` when the number of tiles is known,
else ``per_tile``, evenly spaced in the detector's order) until it reaches ``target_cells`` (the ICSH's
count of 1,000 by default), so its cost is bounded whatever the slide's size.
Only red cells the watershed separates are sampled (runtime/detection.detect_red_cells keeps regions of
one red cell's area), pixels of white cells and platelets excluded: the monolayer, where cells are read.

Size features (macrocytes, microcytes) depend on the slide's pixel scale. Where that scale was itself
estimated from the red cells, a slide of small cells looks normal-sized: those features are then
reported as not assessed, never graded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cytoedge.kernels import cell_table
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch, on_input_lattice, to_model_scale
from cytoedge.runtime.classify_cells import classify_batch
from cytoedge.runtime.detection import detect_red_cells
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.rbc_grading import red_cell_reading

SIZE_CLASSES = ("macrocyte", "microcyte")  # graded only where the slide's scale was not read off its red cells


@dataclass(frozen=True)
class RedCellSampling:
    target_cells: int = 1000  # ICSH: grade on a count of at least 1,000 red cells
    per_tile: int = 250  # at most this many from one tile when the slide's tile count is not known
    min_per_tile: int = 20  # a tile's share is never below this (a slide of many tiles fills up sooner)
    batch_cells: int = 512


class RedCellReader:
    """Samples, classifies and counts a slide's red cells with a red-cell bundle (``cell_type`` "red")."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, sampling: RedCellSampling = RedCellSampling()):
        if bundle.cell_type != "red":
            raise CytoedgeError(f"{bundle.path}: a {bundle.cell_type}-cell bundle cannot read red cells "
                                "(--red-cell-model needs a bundle whose manifest says cell_type 'red')")
        if bundle.grading is None:
            raise CytoedgeError(f"{bundle.path}: the red-cell bundle has no grading table (grading.json)")
        if bundle.calibration is None:
            raise CytoedgeError(f"{bundle.path}: the red-cell bundle is not calibrated; run `cytoedge calibrate`")
        self.bundle, self.backend, self.sampling = bundle, backend, sampling
        self.reset()

    def reset(self, tiles: int | None = None) -> None:
        """A new slide; ``tiles``: how many tiles it has, if known (its sample is then spread over them)."""
        s = self.sampling
        self.per_tile = s.per_tile if not tiles else max(s.min_per_tile, -(-2 * s.target_cells // tiles))
        self.counts = {c: 0 for c in self.bundle.class_names}
        self.seen = 0  # separated red cells met in the tile cores read until the sample was complete
        self.seconds = 0.0
        self.sample: list[dict] = []  # each classified cell: slide centre and class (for the DICOM annotations)
        self.probabilities: list[list[float]] = []  # each classified cell's, in class order (for the corrected shares)
        self._tiles: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._centres: list[tuple[float, float]] = []

    @property
    def sampled(self) -> int:
        return sum(self.counts.values()) + len(self._rows)

    def add_tile(self, rgb: np.ndarray, um_per_px: float, core: tuple[int, int, int, int],
                 exclude: np.ndarray | None, origin: tuple[int, int] = (0, 0)) -> None:
        """Sample the separated red cells whose centres lie in ``core`` (tile pixels x0, y0, x1, y1); the
        tile's top-left lies at ``origin`` in slide pixels."""
        room = min(self.per_tile, self.sampling.target_cells - self.sampled)
        if room <= 0:
            return
        t0 = time.perf_counter()
        centres, _ = detect_red_cells(rgb, um_per_px, exclude)
        x0, y0, x1, y1 = core
        inside = centres[(centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)]
        self.seen += len(inside)
        if len(inside):
            pick = inside[np.unique(np.linspace(0, len(inside) - 1, min(room, len(inside))).round().astype(int))]
            model_tile = to_model_scale(rgb, um_per_px, self.bundle)
            f = model_tile.shape[1] / rgb.shape[1]
            size = self.bundle.input_size
            index = len(self._tiles)
            self._tiles.append(model_tile)
            for cx, cy in pick:
                self._rows.append(cell_table(index, on_input_lattice((cx + 0.5) * f - 0.5, size),
                                             on_input_lattice((cy + 0.5) * f - 0.5, size))[0])
                self._centres.append((round(float(cx) + origin[0], 1), round(float(cy) + origin[1], 1)))
            if len(self._rows) >= self.sampling.batch_cells:
                self._classify()
        self.seconds += time.perf_counter() - t0

    def flush(self) -> None:
        t0 = time.perf_counter()
        self._classify()
        self.seconds += time.perf_counter() - t0

    def _classify(self) -> None:
        if not self._rows:
            return
        records = classify_batch(CellBatch(self._tiles, np.stack(self._rows)), self.bundle, self.backend, "fast")
        for record, centre in zip(records, self._centres):
            self.counts[record["class"]] += 1
            self.sample.append({"centre": list(centre), "class": record["class"]})
            self.probabilities.append([record["probabilities"][c] for c in self.bundle.class_names])
        self._tiles, self._rows, self._centres = [], [], []

    def checkpoint(self) -> dict:
        """What the slide's tiles so far left (JSON-ready): with ``restore``, a resumed slide goes on."""
        self.flush()
        return {"counts": dict(self.counts), "seen": self.seen, "seconds": self.seconds, "sample": self.sample,
                "probabilities": [list(row) for row in self.probabilities]}  # as the records round them

    def restore(self, checkpoint: dict) -> None:
        self.reset()
        self.counts.update({c: int(k) for c, k in checkpoint["counts"].items() if c in self.counts})
        self.seen, self.seconds = int(checkpoint["seen"]), float(checkpoint["seconds"])
        self.sample = [{"centre": list(c["centre"]), "class": c["class"]} for c in checkpoint.get("sample") or []]
        rows = checkpoint.get("probabilities") or []
        if all(len(r) == len(self.bundle.class_names) for r in rows):  # else graded from the counts
            self.probabilities = [[float(v) for v in r] for r in rows]

    def reading(self, scale_source: str | None) -> dict:
        """The slide's red-cell block (runtime/rbc_grading.red_cell_reading), with the sample; its cost is
        ``seconds`` (the run's timings, not the summary: two runs of a slide give the same summary)."""
        self.flush()
        grading = self.bundle.grading
        estimated = scale_source == "red-cells"
        if estimated:  # the size features cannot be read at a scale taken from the cells' own size
            grading = {**grading, "features": {c: f for c, f in grading["features"].items() if c not in SIZE_CLASSES}}
        probabilities = np.array(self.probabilities) if len(self.probabilities) == self.sampled else None
        out = red_cell_reading(self.counts, grading, probabilities)
        out.update({"model": self.bundle.name, "bundle_sha256": self.bundle.sha256,
                    "separated_red_cells_seen": self.seen, "target_cells": self.sampling.target_cells,
                    "size_features": "not assessed: the slide's scale was estimated from its red cells" if estimated
                    else "assessed"})
        return out
