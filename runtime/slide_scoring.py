"""Whole-slide scoring: the stages of a slide, run over its tiles in order.

source (runtime/sources.py) → scale (runtime/scale.py) → detect (runtime/detection.py) → stain map
(runtime/slide_stain.py) → cut (runtime/cutting.py) → estimate and decide (runtime/classify_cells.py)
→ explain (runtime/explain.py) → aggregate (runtime/summary.py) → emit (runtime/result_document.py).
:class:`SlideScorer` runs them and is the stable API the CLI and the ZeroMQ service call:

- ``score_source(source)`` streams cell records as their batches finish (a fresh slide each call);
- ``score_tile(rgb, origin_xy, um_per_px)`` scores one tile sent in-band and adds it to the slide;
- ``summary()`` returns the slide summary; ``scored()`` the stages' outputs the reports draw on.

Tiles are processed one at a time; at most ``batch_cells`` cells (and the model-scale tiles they
come from) are held before they are classified, so memory is bounded by the tile and the batch.
Cells are numbered in raster order of the tiles, so the same slide always gives the same records.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cell_views import CellView, cut_cell_view, view_side_px
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.classify_cells import classify_batch
from cytoedge.runtime.cutting import CellCutter, PendingCells
from cytoedge.runtime.detection import Detection, DetectionSettings, detect_cells
from cytoedge.runtime.errors import CytoedgeError, InputImageError
from cytoedge.runtime.explain import HeatmapExplainer
from cytoedge.runtime.heatmap import heatmap_plan
from cytoedge.runtime.limits import MAX_MODEL_SCALE_TILE_PIXELS, InputLimitError, check_um_per_px
from cytoedge.runtime.result_document import cell_record, run_audit, slide_entry
from cytoedge.runtime.scale import ScaleEstimate, resolve_scale
from cytoedge.runtime.slide_pictures import SlidePictures, SlideThumbnail
from cytoedge.runtime.slide_stain import check_stain_options, slide_stain
from cytoedge.runtime.sources import FolderSource, SlideSource, Tile
from cytoedge.runtime.summary import SlideTally, TriagePolicy, join_triage, summarise_slide

if TYPE_CHECKING:
    from cytoedge.runtime.red_cells import RedCellReader

log = logging.getLogger(__name__)

DENSITY_BINS = 16  # bins along a slide's longest side when the bin size is not set
ClassifyFn = Callable[[CellBatch, ModelBundle, DenoiserBackend, str], list[dict]]


@dataclass(frozen=True)
class ScoringOptions:
    """How a slide is read and scored. Sizes in µm are converted with the slide's scale."""

    um_per_px: float | None = None  # overrides the file's scale and the estimate
    stain_normalise: bool = True
    # "slide": one Reinhard map per slide, fitted on its first tile with cells; "cell": fitted on a PBC-sized
    # field around each cell. Per slide by default: on PBC crops a map fitted on each cell's own field costs
    # 9 points of balanced accuracy (0.906 → 0.819; one pooled map: 0.904): the map then follows each field's own
    # framing and red-cell density (fitting it without the cell did not help); on BCCD's foreign stain both recover the type about alike (0.339 per field,
    # 0.368 per cell, 0.025 unnormalised; benchmarks/RESULTS.md, session 4).
    stain_context: str = "slide"
    # "reinhard", "macenko" or "histogram" (runtime/stain.py). Reinhard by default: zero-shot on BCCD fields
    # histogram matching ties it (0.188 vs 0.186) at 3.7 points more lost on PBC crops, Macenko is below both
    # (0.122; PBC 0.656) (benchmarks/RESULTS.md, "Stain normalisation choices").
    stain_method: str = "reinhard"
    stain_field_um: float = 36.0  # side of the per-cell field (a PBC crop: 360 px at ~0.1 µm/px)
    tile_px: int = 2048  # source pixels per tile core (DICOM: rounded to whole frames)
    overlap_um: float = 32.0  # ≥ the largest white cell, so a border cell is whole in some tile
    batch_cells: int = 256
    heatmaps: bool = True
    heatmap_cells: str = "flagged"  # or "all": which cells get a heatmap
    max_heatmaps: int = 64  # per slide; cells beyond this get none
    review_cells: int = 5000  # cells per slide whose views (a few kB each) are kept for the review page
    thumbnail_px: int = 2048  # longest side of the slide thumbnail the overlay is drawn on
    density_bin_um: float | None = None  # None: the slide's longest side in DENSITY_BINS bins, 25-200 µm each
    detection: DetectionSettings = field(default_factory=DetectionSettings)


@dataclass(frozen=True)
class ScoredSlide:
    """A slide's stage outputs, as the reports draw on them: records, tally, scale, pictures, red-cell
    sample, per-stage seconds and per-stage counts (``counts``: tiles read and resampled, cells, and the
    cuts the kernels made, one per cell and probe view when nothing is cut twice)."""

    records: list[dict]
    tally: SlideTally
    scale: ScaleEstimate | None
    pictures: SlidePictures
    timings: dict[str, float]
    counts: dict[str, int]
    red_sample: dict | None


class SlideScorer:
    """Scores slides with one bundle, backend and estimator (see the module docstring)."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, estimator: str = "fast",
                 options: ScoringOptions = ScoringOptions(), classify: ClassifyFn = classify_batch,
                 red_cells: "RedCellReader | None" = None):
        check_stain_options(options.stain_method, options.stain_context)
        if bundle.cell_type != "white":  # the slide's cells are found by their nuclei: white cells
            raise CytoedgeError(f"{bundle.path} reads {bundle.cell_type} cells; scoring a slide reads its white cells "
                                "with a white-cell bundle (a red-cell bundle classifies red-cell crops: cytoedge classify)")
        self.bundle, self.backend, self.estimator, self.options = bundle, backend, estimator, options
        self._classify = classify
        self._red = red_cells  # the red-cell stage (runtime/red_cells.py), if a red-cell bundle is given
        self._stain = slide_stain(bundle, options.stain_method, options.stain_context) if options.stain_normalise else None
        self._cutter = CellCutter(bundle, self._stain, options.stain_field_um)
        # Counterfactual maps are pixel-space: a latent bundle's errors have no pixel to point at.
        plan = heatmap_plan(bundle) if options.heatmaps and not bundle.is_latent else None
        self._explainer = HeatmapExplainer(bundle, backend, plan, options.heatmap_cells, options.max_heatmaps)
        self._policy = TriagePolicy.from_bundle(bundle)
        self.audit = run_audit(bundle, backend, estimator)
        self.reset()

    # ---- public API -------------------------------------------------------------------------
    def reset(self, name: str = "(tiles)", single_plane: bool = True) -> None:
        """Start a new slide (``score_source`` does this itself). ``single_plane``: False for a folder of
        fields, whose coordinates are each field's own (no thumbnail)."""
        self.records: list[dict] = []
        self.tally = SlideTally(name)
        self.scale: ScaleEstimate | None = None
        self.timings: dict[str, float] = {}
        self.pictures = SlidePictures(SlideThumbnail(self.options.thumbnail_px) if single_plane else None)
        self.red_sample: dict | None = None
        self._cuts = 0
        self._cutter.tiles_resampled = self._explainer.cut_count = 0
        if self._stain is not None:
            self._stain.reset()
        if self._red is not None:
            self._red.reset()

    def score_source(self, source: SlideSource) -> Iterator[dict]:
        """Stream the cell records of one slide; InputImageError if it cannot be read at all."""
        self.reset(source.name, single_plane=not isinstance(source, FolderSource))
        tally = self.tally
        tally.width, tally.height = source.width, source.height
        t = time.perf_counter()
        self.scale = self._resolve_scale(source)
        t = self._tick("scale", t)
        check_um_per_px(self.scale.um_per_px, f"{source.name}: pixel size ({self.scale.source})")
        overlap = int(math.ceil(self.options.overlap_um / self.scale.um_per_px))
        core = self._tile_core_px(self.scale.um_per_px, overlap)
        if self._red is not None and self.pictures.thumbnail is not None:  # the red sample spreads over the tiles
            self._red.reset(math.ceil(tally.width / core) * math.ceil(tally.height / core))
        pending = PendingCells()
        for tile in source.tiles(core, overlap):
            tally.width, tally.height = max(tally.width, source.width), max(tally.height, source.height)
            t = self._tick("read", t)
            self._add_tile(tile, self.scale.um_per_px, pending)
            if len(pending) >= self.options.batch_cells:
                yield from self._flush(pending)
            t = time.perf_counter()
        yield from self._flush(pending)
        tally.failures.extend(getattr(source, "failures", []))

    def score_tile(self, rgb_tile: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        """Score one RGB uint8 tile whose top-left is ``origin_xy`` in slide pixels (it owns all its cells)."""
        if rgb_tile.ndim != 3 or rgb_tile.shape[2] != 3 or rgb_tile.dtype != np.uint8:
            raise InputImageError(f"tile at {origin_xy}: expected RGB uint8 [H, W, 3], got {rgb_tile.dtype} "
                                  f"{rgb_tile.shape}")
        if not um_per_px or um_per_px <= 0:
            raise InputImageError(f"tile at {origin_xy}: um_per_px must be positive, got {um_per_px}")
        if self.scale is None:
            self.scale = ScaleEstimate(float(um_per_px), "user")
        x0, y0 = int(origin_xy[0]), int(origin_xy[1])
        h, w = rgb_tile.shape[:2]
        self.tally.width, self.tally.height = max(self.tally.width, x0 + w), max(self.tally.height, y0 + h)
        pending = PendingCells()
        self._add_tile(Tile(rgb_tile, x0, y0, (x0, y0, x0 + w, y0 + h), self.tally.name), float(um_per_px), pending)
        return list(self._flush(pending))

    def summary(self) -> dict:
        """Summary of the slide scored last (or of the tiles sent since the last reset), with its red-cell
        reading when a red-cell bundle is given (its triage joins the slide's)."""
        summary = summarise_slide(self.records, self.tally, self.scale,
                                  self._stain.describe() if self._stain is not None else None,
                                  self.bundle, self._policy, self._density_bin_um())
        if self._red is not None:
            red = self._red.reading(self.scale.source if self.scale else None)
            self.timings["red_cells"] = self._red.seconds  # detection, sampling and classification
            summary["red_cells"] = red
            self.red_sample = {"model": red["model"], "bundle_sha256": red["bundle_sha256"],
                               "cells": list(self._red.sample)}
            summary["triage"] = join_triage(summary["triage"], red["triage"], "red cells")
        return summary

    def scored(self) -> ScoredSlide:
        """What the stages left of the slide scored last, for the reports (after ``summary()``)."""
        counts = {"tiles": self.tally.tiles, "tiles_resampled": self._cutter.tiles_resampled,
                  "cells": len(self.records), "cell_cuts": self._cuts,
                  "heatmap_cell_cuts": self._explainer.cut_count}
        return ScoredSlide(list(self.records), self.tally, self.scale, self.pictures, dict(self.timings), counts,
                           self.red_sample)

    def checkpoint(self) -> dict:
        """What the tiles scored so far left in the slide's state, besides their records (JSON-ready,
        full precision): with the records, ``restore`` continues the slide exactly, without the pixels."""
        t = self.tally
        return {"name": t.name, "width": t.width, "height": t.height,
                "scale": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self.scale).items()}
                if self.scale else None,
                **(self._stain.checkpoint() if self._stain is not None else {"stain": None, "stain_tried": False}),
                "platelets": t.platelets, "red_cells": t.red_cells, "tiles": t.tiles, "area_px": t.area_px,
                "explained": sorted(self.pictures.explained),
                "red_cell_reader": self._red.checkpoint() if self._red else None}

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        """Continue a slide from ``checkpoint()`` and its records (thumbnail, cell views and heatmap
        images are not restored: they feed local reports only, not records or the summary)."""
        self.reset(checkpoint["name"])
        t = self.tally
        t.width, t.height = checkpoint["width"], checkpoint["height"]
        self.scale = ScaleEstimate(**checkpoint["scale"]) if checkpoint["scale"] else None
        if self._stain is not None:
            self._stain.restore(checkpoint)
        t.platelets, t.red_cells = checkpoint["platelets"], checkpoint["red_cells"]
        t.tiles, t.area_px = checkpoint["tiles"], checkpoint["area_px"]
        self.records = list(records)
        self.pictures.explained = {int(i) for i in checkpoint["explained"]}
        if self._red is not None and checkpoint.get("red_cell_reader"):
            self._red.restore(checkpoint["red_cell_reader"])

    # ---- the stages, tile by tile ---------------------------------------------------------------
    def _tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now

    def _density_bin_um(self) -> float:
        """The density map's bin: as set, else one that gives a whole slide (200 µm) and a camera field
        (25 µm) a readable grid rather than 2 × 2 squares."""
        if self.options.density_bin_um or self.scale is None:
            return self.options.density_bin_um or 200.0
        longest_um = max(self.tally.width, self.tally.height) * self.scale.um_per_px
        return float(np.clip(longest_um / DENSITY_BINS, 25.0, 200.0))

    def _tile_core_px(self, um_per_px: float, overlap: int) -> int:
        """``tile_px``, shrunk so that a tile (core and overlap on both sides) resampled to the model's scale
        stays within MAX_MODEL_SCALE_TILE_PIXELS: a coarse scale is upsampled, and its tiles with it."""
        factor = um_per_px / self.bundle.um_per_px
        core = int(math.isqrt(MAX_MODEL_SCALE_TILE_PIXELS) / factor) - 2 * overlap
        if core < 1:
            raise InputLimitError(f"{um_per_px:g} µm/px: a tile with its {overlap}-px overlap would be over "
                                  f"{MAX_MODEL_SCALE_TILE_PIXELS:,} pixels at the model's "
                                  f"{self.bundle.um_per_px:g} µm/px")
        return min(self.options.tile_px, core)

    def _resolve_scale(self, source: SlideSource) -> ScaleEstimate:
        user, known = self.options.um_per_px, getattr(source, "um_per_px", None)
        if user or known:
            return resolve_scale(None, user, known, source.name)
        for tile in source.tiles(self.options.tile_px, 0):
            return resolve_scale(tile.rgb, None, None, source.name)
        raise InputImageError(f"{source.name}: no pixels to read")

    def _add_tile(self, tile: Tile, um_per_px: float, pending: PendingCells) -> None:
        """Detect the tile's cells, draw it on the thumbnail, and cut the white cells its core owns."""
        tally, opt = self.tally, self.options
        t = time.perf_counter()
        cx0, cy0, cx1, cy1 = tile.core
        tally.tiles += 1
        tally.area_px += (cx1 - cx0) * (cy1 - cy0)
        core_local = (cx0 - tile.x0, cy0 - tile.y0, cx1 - tile.x0, cy1 - tile.y0)
        det = detect_cells(tile.rgb, um_per_px, opt.detection, count_region=core_local)
        white = [d for d in det.white if tile.owns(np.float64(d.cx + tile.x0), np.float64(d.cy + tile.y0))]
        tally.platelets += sum(bool(tile.owns(np.float64(d.cx + tile.x0), np.float64(d.cy + tile.y0)))
                               for d in det.platelets)
        tally.red_cells += det.red_cell_count
        t = self._tick("detect", t)
        if self._red is not None:  # timed by the reader itself (it classifies in batches, the last at summary)
            self._red.add_tile(tile.rgb, um_per_px, core_local, _boxes_mask(tile.rgb.shape[:2], det.white + det.platelets),
                               (tile.x0, tile.y0))
            t = time.perf_counter()
        if self.pictures.thumbnail is not None:
            self.pictures.thumbnail.draw(tile, tally.width, tally.height)
        if not white:
            return
        views = self._views(tile, white, um_per_px, len(pending))
        self._tick("views", t)
        self._cutter.add(tile, white, um_per_px, pending, views, tally.name, self._tick)

    def _views(self, tile: Tile, white: list[Detection], um_per_px: float, pending: int) -> list[CellView | None]:
        """Each cell's view as scanned (before stain), while the review page's limit has room, or for its
        mask should it get a heatmap; serve, calibrate and adapt (review_cells 0, no heatmaps) cut none."""
        if self._explainer.plan is None and len(self.pictures.views) + pending >= self.options.review_cells:
            return [None] * len(white)
        side = view_side_px(self.bundle.input_size * self.bundle.um_per_px, um_per_px)
        return [cut_cell_view(tile.rgb, d, side, um_per_px) for d in white]

    def _flush(self, pending: PendingCells) -> Iterator[dict]:
        """Classify the pending cells, make their records, explain the flagged ones."""
        if not len(pending):
            return
        batch = pending.batch()
        t = time.perf_counter()
        results = self._classify(batch, self.bundle, self.backend, self.estimator)
        t = self._tick("classify", t)
        scored = []
        for i, (meta, res) in enumerate(zip(pending.meta, results)):
            record = {"id": len(self.records), **meta, **cell_record(res, self.bundle), "audit": self.audit}
            self.records.append(record)
            scored.append((i, record))
            if pending.views[i] is not None and len(self.pictures.views) < self.options.review_cells:
                self.pictures.views[record["id"]] = pending.views[i].without_mask()
        self._explainer.explain(batch, scored, pending.views, self.pictures)
        self._cuts += batch.cut_count
        self._tick("heatmap", t)
        pending.tiles, pending.rows, pending.meta, pending.views = [], [], [], []
        yield from (r for _, r in scored)


def _boxes_mask(shape: tuple[int, int], detections: list[Detection]) -> np.ndarray:
    """uint8 0/1 mask of the detections' boxes: pixels that are no red cell's."""
    mask = np.zeros(shape, np.uint8)
    for d in detections:
        x0, y0, x1, y1 = (int(round(v)) for v in d.bbox)
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return mask


def score_slide(scorer: SlideScorer, source: SlideSource) -> dict:
    """Score one source to the end as a document entry (a slide with no white cells is an error)."""
    cells = list(scorer.score_source(source))
    summary = scorer.summary()
    if not cells:
        return slide_entry(source.name, [], summary,
                           f"{source.name}: no white cells found (empty field, wrong scale or not a blood smear)")
    return slide_entry(source.name, cells, summary)


def options_dict(options: ScoringOptions) -> dict:
    """The options as JSON-ready data (recorded in the document's "run")."""
    return asdict(options)
