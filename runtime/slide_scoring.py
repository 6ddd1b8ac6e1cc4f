"""Whole-slide scoring: source → scale → detection → stain normalisation → batched classification.

:class:`SlideScorer` is the stable API the CLI and the ZeroMQ service call:

- ``score_source(source)`` streams cell records as their batches finish (a fresh slide each call);
- ``score_tile(rgb, origin_xy, um_per_px)`` scores one tile sent in-band and adds it to the slide;
- ``summary()`` returns the slide summary (counts, differential, flags, triage, density map);
- :func:`build_result_document` wraps records and summaries in the versioned JSON document
  (docs/results-format.md, docs/schemas/result-document.schema.json).

Tiles are processed one at a time; at most ``batch_cells`` cells (and the model-scale tiles they
come from) are held before they are classified, so memory is bounded by the tile and the batch.
Cells are numbered in raster order of the tiles, so the same slide always gives the same records.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import cv2
import numpy as np

from cytoedge.kernels import cell_table
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cell_views import CellView, cut_cell_view, heatmap_overlay, mass_inside, png_bytes, view_side_px
from cytoedge.runtime.cells import CellBatch, on_input_lattice, to_model_scale
from cytoedge.runtime.classify_cells import classify_batch, mark_unreliable
from cytoedge.runtime.detection import Detection, DetectionSettings, detect_cells
from cytoedge.runtime.errors import CytoedgeError, InputImageError
from cytoedge.runtime.heatmap import counterfactual_heatmaps, heatmap_plan
from cytoedge.runtime.limits import MAX_MODEL_SCALE_TILE_PIXELS, InputLimitError, check_um_per_px
from cytoedge.runtime.scale import ScaleEstimate, resolve_scale
from cytoedge.runtime.sources import FolderSource, SlideSource, Tile
from cytoedge.runtime.stain import METHODS, StainMap, stain_normaliser
from cytoedge.runtime.summary import TriagePolicy, summarise_slide

if TYPE_CHECKING:
    from cytoedge.runtime.red_cells import RedCellReader

log = logging.getLogger(__name__)

DENSITY_BINS = 16  # bins along a slide's longest side when the bin size is not set
RESULT_FORMAT = "cytoedge-result"
RESULT_FORMAT_VERSION = 1
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


@dataclass
class SlideState:
    """Everything one slide accumulates while it is scored (records are small dicts)."""

    name: str
    width: int = 0
    height: int = 0
    scale: ScaleEstimate | None = None
    stain: StainMap | None = None
    stain_context: str | None = None  # None: not normalised
    stain_method: str | None = None
    stain_tried: bool = False  # the slide's map was fitted (or could not be: its colours stay as scanned)
    records: list[dict] = field(default_factory=list)
    platelets: int = 0
    red_cells: int = 0
    tiles: int = 0
    area_px: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    thumbnail: np.ndarray | None = None  # not kept for a folder: its fields have their own coordinates
    single_plane: bool = True
    thumb_scale: float = 1.0
    views: dict[int, CellView] = field(default_factory=dict)  # the first ``review_cells`` cells
    explained: set[int] = field(default_factory=set)  # flagged cells given a heatmap (or its turn, without a plan)
    heatmaps: dict[int, np.ndarray] = field(default_factory=dict)  # [S, S] maps, model input frame
    overlays: dict[int, bytes] = field(default_factory=dict)  # RGBA PNG of each map on its cell's view
    red_sample: dict | None = None  # the red cells read: model, bundle_sha256, cells (slide centre, class)
    failures: list[dict] = field(default_factory=list)

    def tick(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - since
        return now


@dataclass
class _Pending:
    tiles: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)
    meta: list[dict] = field(default_factory=list)
    views: list[CellView | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.meta)


def estimator_settings(bundle: ModelBundle, estimator: str) -> dict:
    """What decides a cell's numbers besides the network: the calibration (fast) or the protocol (reference)."""
    if estimator == "reference":
        from cytoedge.runtime.reference_estimator import ReferenceSettings

        return {"name": "reference", **asdict(ReferenceSettings())}
    cal = bundle.calibration
    doc = cal.to_dict() if cal is not None else {}  # the file's JSON: its sha256 is the same for the same file
    return {"name": estimator,
            "calibration_sha256": hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(),
            "calibration_date": cal.provenance.get("date") if cal is not None else None,
            "probes": len(cal.probes) if cal is not None else 0,
            "temperature": cal.temperature if cal is not None else None}


def run_audit(bundle: ModelBundle, backend: DenoiserBackend, estimator: str) -> dict:
    """What decided a run's numbers: software, exact bundle, backend, estimator and its settings."""
    from cytoedge.runtime import __version__

    return {"cytoedge_version": __version__, "model": bundle.name, "bundle_sha256": bundle.sha256,
            "backend": backend.name, "estimator": estimator, "estimator_settings": estimator_settings(bundle, estimator)}


class SlideScorer:
    """Scores slides with one bundle, backend and estimator (see the module docstring)."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, estimator: str = "fast",
                 options: ScoringOptions = ScoringOptions(), classify: ClassifyFn = classify_batch,
                 red_cells: "RedCellReader | None" = None):
        if options.stain_context not in ("cell", "slide"):
            raise CytoedgeError(f"stain_context {options.stain_context!r}: choose 'cell' or 'slide'")
        if options.stain_method not in METHODS:
            raise CytoedgeError(f"stain_method {options.stain_method!r}: choose one of {', '.join(METHODS)}")
        if options.heatmap_cells not in ("flagged", "all"):
            raise CytoedgeError(f"heatmap_cells {options.heatmap_cells!r}: choose 'flagged' or 'all'")
        if bundle.cell_type != "white":  # the slide's cells are found by their nuclei: white cells
            raise CytoedgeError(f"{bundle.path} reads {bundle.cell_type} cells; scoring a slide reads its white cells "
                                "with a white-cell bundle (a red-cell bundle classifies red-cell crops: cytoedge classify)")
        self.bundle, self.backend, self.estimator, self.options = bundle, backend, estimator, options
        self._classify = classify
        self._red = red_cells  # the red-cell stage (runtime/red_cells.py), if a red-cell bundle is given
        self._stain = stain_normaliser(bundle, options.stain_method) if options.stain_normalise else None
        # Counterfactual maps are pixel-space: a latent bundle's errors have no pixel to point at.
        self._plan = heatmap_plan(bundle) if options.heatmaps and not bundle.manifest.get("latent") else None
        self._policy = TriagePolicy.from_bundle(bundle)
        self._colour = bundle.colour_transform()
        self.audit = run_audit(bundle, backend, estimator)
        self.reset()

    # ---- public API -------------------------------------------------------------------------
    def reset(self, name: str = "(tiles)") -> None:
        """Start a new slide (``score_source`` does this itself)."""
        self.state = SlideState(name, stain_context=self.options.stain_context if self._stain else None,
                                stain_method=self.options.stain_method if self._stain else None)
        if self._red is not None:
            self._red.reset()

    def score_source(self, source: SlideSource) -> Iterator[dict]:
        """Stream the cell records of one slide; InputImageError if it cannot be read at all."""
        self.reset(source.name)
        st = self.state
        st.single_plane = not isinstance(source, FolderSource)
        st.width, st.height = source.width, source.height
        t = time.perf_counter()
        st.scale = self._resolve_scale(source)
        t = st.tick("scale", t)
        check_um_per_px(st.scale.um_per_px, f"{source.name}: pixel size ({st.scale.source})")
        overlap = int(math.ceil(self.options.overlap_um / st.scale.um_per_px))
        core = self._tile_core_px(st.scale.um_per_px, overlap)
        if self._red is not None and st.single_plane:  # the red-cell sample is spread over the slide's tiles
            self._red.reset(math.ceil(st.width / core) * math.ceil(st.height / core))
        pending = _Pending()
        for tile in source.tiles(core, overlap):
            st.width, st.height = max(st.width, source.width), max(st.height, source.height)
            t = st.tick("read", t)
            self._add_tile(tile, st.scale.um_per_px, pending)
            if len(pending) >= self.options.batch_cells:
                yield from self._flush(pending)
            t = time.perf_counter()
        yield from self._flush(pending)
        st.failures.extend(getattr(source, "failures", []))

    def score_tile(self, rgb_tile: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        """Score one RGB uint8 tile whose top-left is ``origin_xy`` in slide pixels (it owns all its cells)."""
        if rgb_tile.ndim != 3 or rgb_tile.shape[2] != 3 or rgb_tile.dtype != np.uint8:
            raise InputImageError(f"tile at {origin_xy}: expected RGB uint8 [H, W, 3], got {rgb_tile.dtype} "
                                  f"{rgb_tile.shape}")
        if not um_per_px or um_per_px <= 0:
            raise InputImageError(f"tile at {origin_xy}: um_per_px must be positive, got {um_per_px}")
        st = self.state
        if st.scale is None:
            st.scale = ScaleEstimate(float(um_per_px), "user")
        x0, y0 = int(origin_xy[0]), int(origin_xy[1])
        h, w = rgb_tile.shape[:2]
        st.width, st.height = max(st.width, x0 + w), max(st.height, y0 + h)
        pending = _Pending()
        self._add_tile(Tile(rgb_tile, x0, y0, (x0, y0, x0 + w, y0 + h), st.name), float(um_per_px), pending)
        return list(self._flush(pending))

    def summary(self) -> dict:
        """Summary of the slide scored last (or of the tiles sent since the last reset), with its red-cell
        reading when a red-cell bundle is given (its triage joins the slide's)."""
        summary = summarise_slide(self.state, self.bundle, self._policy, self._density_bin_um())
        if self._red is not None:
            red = self._red.reading(self.state.scale.source if self.state.scale else None)
            self.state.timings["red_cells"] = self._red.seconds  # detection, sampling and classification
            summary["red_cells"] = red
            self.state.red_sample = {"model": red["model"], "bundle_sha256": red["bundle_sha256"],
                                     "cells": list(self._red.sample)}
            summary["triage"] = join_triage(summary["triage"], red["triage"], "red cells")
        return summary

    def checkpoint(self) -> dict:
        """What the tiles scored so far left in the slide's state, besides their records (JSON-ready,
        full precision): with the records, ``restore`` continues the slide exactly, without the pixels."""
        st = self.state
        return {"name": st.name, "width": st.width, "height": st.height,
                "scale": {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(st.scale).items()}
                if st.scale else None,
                "stain": st.stain.to_dict(None) if st.stain else None, "stain_tried": st.stain_tried,
                "platelets": st.platelets, "red_cells": st.red_cells, "tiles": st.tiles, "area_px": st.area_px,
                "explained": sorted(st.explained), "red_cell_reader": self._red.checkpoint() if self._red else None}

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        """Continue a slide from ``checkpoint()`` and its records (thumbnail, cell views and heatmap
        images are not restored: they feed local reports only, not records or the summary)."""
        self.reset(checkpoint["name"])
        st = self.state
        st.width, st.height = checkpoint["width"], checkpoint["height"]
        st.scale = ScaleEstimate(**checkpoint["scale"]) if checkpoint["scale"] else None
        stain = checkpoint["stain"]
        st.stain = self._stain.restore(stain) if stain and self._stain else None
        st.stain_tried = checkpoint.get("stain_tried", st.stain is not None)
        st.platelets, st.red_cells = checkpoint["platelets"], checkpoint["red_cells"]
        st.tiles, st.area_px = checkpoint["tiles"], checkpoint["area_px"]
        st.records = list(records)
        st.explained = {int(i) for i in checkpoint["explained"]}
        if self._red is not None and checkpoint.get("red_cell_reader"):
            self._red.restore(checkpoint["red_cell_reader"])

    # ---- internals --------------------------------------------------------------------------
    def _density_bin_um(self) -> float:
        """The density map's bin: as set, else one that gives a whole slide (200 µm) and a camera field
        (25 µm) a readable grid rather than 2 × 2 squares."""
        st = self.state
        if self.options.density_bin_um or st.scale is None:
            return self.options.density_bin_um or 200.0
        longest_um = max(st.width, st.height) * st.scale.um_per_px
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

    def _add_tile(self, tile: Tile, um_per_px: float, pending: _Pending) -> None:
        st, opt = self.state, self.options
        t = time.perf_counter()
        cx0, cy0, cx1, cy1 = tile.core
        st.tiles += 1
        st.area_px += (cx1 - cx0) * (cy1 - cy0)
        core_local = (cx0 - tile.x0, cy0 - tile.y0, cx1 - tile.x0, cy1 - tile.y0)
        det = detect_cells(tile.rgb, um_per_px, opt.detection, count_region=core_local)
        white = [d for d in det.white if tile.owns(np.float64(d.cx + tile.x0), np.float64(d.cy + tile.y0))]
        st.platelets += sum(bool(tile.owns(np.float64(d.cx + tile.x0), np.float64(d.cy + tile.y0)))
                            for d in det.platelets)
        st.red_cells += det.red_cell_count
        t = st.tick("detect", t)
        if self._red is not None:  # timed by the reader itself (it classifies in batches, the last at summary)
            self._red.add_tile(tile.rgb, um_per_px, core_local, _boxes_mask(tile.rgb.shape[:2], det.white + det.platelets),
                               (tile.x0, tile.y0))
            t = time.perf_counter()
        self._update_thumbnail(tile)
        if not white:
            return
        # A cell's view (as scanned: before stain) is cut while the page's limit has room, or for its mask
        # should it get a heatmap; serve, calibrate and adapt (review_cells 0, no heatmaps) cut none.
        views: list[CellView | None] = [None] * len(white)
        if self._plan is not None or len(st.views) + len(pending) < opt.review_cells:
            side = view_side_px(self.bundle.input_size * self.bundle.um_per_px, um_per_px)
            views = [cut_cell_view(tile.rgb, d, side, um_per_px) for d in white]
        if st.stain_context == "cell":
            self._add_cells_normalised_each(tile, white, um_per_px, pending)
            pending.views.extend(views)
            st.tick("stain", t)
            return
        rgb = tile.rgb
        if st.stain_context == "slide":
            if not st.stain_tried:
                st.stain, st.stain_tried = self._stain.fit(rgb), True
                if st.stain is None:
                    log.warning("%s: too little stain on its first tile with cells to fit a %s map on; its "
                                "colours are left as scanned", st.name, self.options.stain_method)
            if st.stain is not None:
                rgb = st.stain.apply(rgb)
        t = st.tick("stain", t)
        model_tile = to_model_scale(rgb, um_per_px, self.bundle)
        f = model_tile.shape[1] / rgb.shape[1]
        index = len(pending.tiles)
        pending.tiles.append(model_tile)
        for d in white:
            size = self.bundle.input_size
            pending.rows.append(cell_table(index, on_input_lattice((d.cx + 0.5) * f - 0.5, size),
                                           on_input_lattice((d.cy + 0.5) * f - 0.5, size))[0])
            pending.meta.append(self._cell_meta(d, tile))
        pending.views.extend(views)
        st.tick("resample", t)

    def _add_cells_normalised_each(self, tile: Tile, white: list[Detection], um_per_px: float,
                                   pending: _Pending) -> None:
        """Per-cell maps: the references come from PBC crops (one white cell centred in a ~36 µm field),
        so each cell is matched on a field of that size around it; it becomes its own small tile.
        Independent of tiling, as the overlap exceeds half the field. A field with too little stain to
        fit on is left as scanned."""
        half = self.options.stain_field_um / 2 / um_per_px
        h, w = tile.rgb.shape[:2]
        for d in white:
            x0, y0 = int(max(round(d.cx - half), 0)), int(max(round(d.cy - half), 0))
            x1, y1 = int(min(round(d.cx + half) + 1, w)), int(min(round(d.cy + half) + 1, h))
            field = tile.rgb[y0:y1, x0:x1]
            field = self._stain.normalise(field)
            model_tile = to_model_scale(field, um_per_px, self.bundle)
            f = model_tile.shape[1] / field.shape[1]
            size = self.bundle.input_size
            pending.rows.append(cell_table(len(pending.tiles), on_input_lattice((d.cx - x0 + 0.5) * f - 0.5, size),
                                           on_input_lattice((d.cy - y0 + 0.5) * f - 0.5, size))[0])
            pending.tiles.append(model_tile)
            pending.meta.append(self._cell_meta(d, tile))

    def _cell_meta(self, d: Detection, tile: Tile) -> dict:
        x0, y0, x1, y1 = d.bbox
        return {
            "bbox": [round(x0 + tile.x0, 1), round(y0 + tile.y0, 1), round(x1 + tile.x0, 1), round(y1 + tile.y0, 1)],
            "centre": [round(d.cx + tile.x0, 1), round(d.cy + tile.y0, 1)],
            "field": tile.field,
            "nucleus_area_um2": round(d.nucleus_area_um2, 2),
        }

    def _flush(self, pending: _Pending) -> Iterator[dict]:
        if not len(pending):
            return
        st = self.state
        batch = CellBatch(pending.tiles, np.stack(pending.rows))
        t = time.perf_counter()
        results = self._classify(batch, self.bundle, self.backend, self.estimator)
        t = st.tick("classify", t)
        names = self.bundle.class_names
        out = []
        for i, (meta, res) in enumerate(zip(pending.meta, results)):
            record = {"id": len(st.records), **meta, **_normalise_result(res, self.bundle), "audit": self.audit}
            st.records.append(record)
            out.append((i, record))
            if pending.views[i] is not None and len(st.views) < self.options.review_cells:
                st.views[record["id"]] = pending.views[i].without_mask()
        self._explain(batch, out, names, pending.views)
        st.tick("heatmap", t)
        pending.tiles, pending.rows, pending.meta, pending.views = [], [], [], []
        yield from (r for _, r in out)

    def _explain(self, batch: CellBatch, out: list[tuple[int, dict]], names: list[str],
                 views: list[CellView | None]) -> None:
        """Heatmaps of flagged (or all) cells, up to ``max_heatmaps`` per slide, and their overlays on the
        cells' views."""
        st, opt = self.state, self.options
        flagged = [(i, r) for i, r in out if opt.heatmap_cells == "all"
                   or any(r["flags"].get(k) for k in ("abnormal", "uncertain", "anomalous"))]
        room = max(0, opt.max_heatmaps - len(st.explained))
        flagged = flagged[:room]
        st.explained.update(r["id"] for _, r in flagged)
        if not flagged or self._plan is None:
            return
        sub = batch.subset(np.array([i for i, _ in flagged]))
        pred = np.array([names.index(r["class"]) for _, r in flagged])
        runner = np.array([names.index(r["runner_up"]) for _, r in flagged])
        maps = counterfactual_heatmaps(sub, pred, runner, self.bundle, self.backend, self._plan, self._colour)
        for (i, r), m in zip(flagged, maps):
            st.heatmaps[r["id"]] = m
            mask = views[i].mask
            st.overlays[r["id"]] = png_bytes(heatmap_overlay(m, mask))
            r["heatmap"] = {"runner_up": r["runner_up"], "timesteps": self._plan.timesteps.tolist(),
                            "plan": self._plan.source, "mean_gain": round(float(m.mean()), 6),
                            "inside_cell_fraction": round(mass_inside(m, mask), 4),
                            "nfe": int(2 * len(self._plan.timesteps))}

    def _update_thumbnail(self, tile: Tile) -> None:
        st = self.state
        if not st.single_plane or not st.width or not st.height:
            return
        self._fit_thumbnail(st.width, st.height)
        s = st.thumb_scale
        cx0, cy0, cx1, cy1 = tile.core
        tx0, ty0 = int(cx0 * s), int(cy0 * s)
        tx1 = min(max(tx0 + 1, int(round(cx1 * s))), st.thumbnail.shape[1])
        ty1 = min(max(ty0 + 1, int(round(cy1 * s))), st.thumbnail.shape[0])
        if tx1 <= tx0 or ty1 <= ty0:
            return
        core = tile.rgb[cy0 - tile.y0:cy1 - tile.y0, cx0 - tile.x0:cx1 - tile.x0]
        st.thumbnail[ty0:ty1, tx0:tx1] = cv2.resize(core, (tx1 - tx0, ty1 - ty0), interpolation=cv2.INTER_AREA)

    def _fit_thumbnail(self, width: int, height: int) -> None:
        """A thumbnail covering ``width × height`` slide pixels within ``thumbnail_px``: streamed tiles
        grow the slide as they come, so what was drawn is shrunk onto a larger canvas when they do."""
        st, limit = self.state, self.options.thumbnail_px
        scale = min(1.0, limit / max(width, height))
        shape = (max(1, round(height * scale)), max(1, round(width * scale)), 3)
        if st.thumbnail is not None and st.thumbnail.shape == shape:
            return
        canvas = np.full(shape, 255, np.uint8)
        if st.thumbnail is not None:
            old = st.thumbnail
            f = scale / st.thumb_scale
            h, w = min(shape[0], max(1, round(old.shape[0] * f))), min(shape[1], max(1, round(old.shape[1] * f)))
            canvas[:h, :w] = cv2.resize(old, (w, h), interpolation=cv2.INTER_AREA)
        st.thumbnail, st.thumb_scale = canvas, scale


def _boxes_mask(shape: tuple[int, int], detections: list[Detection]) -> np.ndarray:
    """uint8 0/1 mask of the detections' boxes: pixels that are no red cell's."""
    mask = np.zeros(shape, np.uint8)
    for d in detections:
        x0, y0, x1, y1 = (int(round(v)) for v in d.bbox)
        mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 1
    return mask


TRIAGE_ORDER = ("routine", "review", "urgent")


def join_triage(slide: dict, part: dict, what: str) -> dict:
    """The slide's triage with a part's (e.g. the red cells'): the more urgent level, both sets of reasons."""
    level = max(slide["level"], part["level"], key=TRIAGE_ORDER.index)
    reasons = [f"{what}: {r}" for r in part["reasons"]]
    return {"level": level, "reasons": (reasons + slide["reasons"]) if part["level"] == "urgent"
            else (slide["reasons"] + reasons)}


def _normalise_result(res: dict, bundle: ModelBundle) -> dict:
    """The estimator's record in the document's shape; keys an estimator does not give are derived
    (and say so) rather than invented: see docs/results-format.md."""
    names = bundle.class_names
    cls = res["class"]
    probs = res.get("probabilities")
    if probs:
        ranked = sorted(probs, key=lambda c: -probs[c])
    else:
        scores = res.get("scores", {})
        ranked = sorted(scores, key=lambda c: scores[c]) if scores else [cls]
    runner_up = next((c for c in ranked if c != cls), next(c for c in names if c != cls))
    flags = dict(res.get("flags") or {})
    flags.setdefault("abnormal", cls in bundle.abnormal_classes)
    flags.setdefault("uncertain", len(res.get("survived", [cls])) > 1 if "survived" in res else False)
    flags.setdefault("anomalous", False)
    out = {
        "class": cls,
        "runner_up": runner_up,
        "probabilities": {c: round(float(p), 6) for c, p in probs.items()} if probs else None,
        "flags": {k: bool(v) for k, v in flags.items()},
        "anomaly_score": res.get("anomaly_score"),
        "typicality": res.get("typicality"),
        "uncertainty": res.get("uncertainty"),
        "prediction_set": res.get("prediction_set") or res.get("survived") or [cls],
        "nfe": int(res.get("nfe", 0)),
        "estimator": res.get("estimator"),
    }
    extra = {k: v for k, v in res.items() if k not in out and k not in ("survived",)}
    if extra:
        out["estimator_detail"] = extra
    return out


def slide_entry(source: str, records: list[dict], summary: dict | None, error: str | None = None) -> dict:
    """One slide of the document: its cells and summary, or its error (with the summary if any).
    Under a raised out-of-domain alarm (the summary's) no cell is labelled confident."""
    mark_unreliable(records, (summary or {}).get("domain_alarm"))
    if error is not None:
        entry = {"source": source, "status": "error", "error": error}
        if summary is not None:
            entry["summary"] = summary
        return entry
    return {"source": source, "status": "ok", "summary": summary, "cells": records}


def build_result_document(records: list[dict], summary: dict, meta: dict) -> dict:
    """The versioned document for one slide. ``meta``: the scorer's ``audit`` plus "source" and,
    optionally, "error" and "run" (timings, time: the only part that differs between two runs)."""
    entry = slide_entry(meta.get("source", summary.get("source", "")), records, summary, meta.get("error"))
    audit = {k: v for k, v in meta.items() if k not in ("source", "error", "run")}
    return build_slides_document([entry], audit, meta.get("run", {}))


def build_slides_document(slides: list[dict], audit: dict, run: dict) -> dict:
    """The versioned document for several slides (entries from :func:`slide_entry`)."""
    return {"format": RESULT_FORMAT, "format_version": RESULT_FORMAT_VERSION, **audit, "run": run,
            "slides": [{**s, "audit": audit} for s in slides]}


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
