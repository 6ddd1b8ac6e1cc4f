"""Pixel scale of single-cell crops, estimated by default: analysers write crops at their own scale.

A crop's scale cannot be assumed (PBC's own crops are ~0.1 µm/px as CellaVision writes them, ~0.2
as shipped here; other analysers differ again), and a crop read at the wrong scale is misread with
confidence. A file that declares a microscope's pixel size (PNG pHYs, TIFF resolution; `cytoedge
synth` writes it) is read at that size. Otherwise each crop's scale is estimated from its red cells
(granulometry, runtime/scale.py), or from the white cell's nucleus where no red cell is visible, as
far as the bundle's ``input.crop_scale.estimate_from`` allows: a red-cell bundle allows neither (the
size of the cell it classifies is a class feature), and reads an undeclared crop at its training scale.
One crop's estimate is noisy (partial red cells at the border, a large white cell), but an analyser
writes all its crops at one scale, so the crops of one size in a run share the median of their
estimates. The estimate is corrected by the bundle's ``input.crop_scale`` (what the same estimator
reads on the training crops, whose scale is known), and one within SNAP of the training crops'
scale is taken to be it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.detection import stained_blobs
from cytoedge.runtime.limits import UM_PER_PX_MAX, UM_PER_PX_MIN
from cytoedge.runtime.scale import (MIN_COVER, RED_CELL_DIAMETER_UM, foreground_mask, granulometric_diameter_px,
                                    refined_diameter_px)

MIN_POOL = 5  # crops of one size group whose median is trusted over each one's own estimate
SIZE_SPREAD = 1.1  # crops whose longest sides are within 10 % are one analyser's
# A pooled estimate within this of the training crops' scale is taken to be that scale: the estimate
# varies by ±2-4 % between sets of one analyser's crops (PBC's two calib halves: 0.198 vs 0.205), and
# the model reads a crop 3 % off its own scale measurably differently (the out-of-domain alarm did).
SNAP = 0.05
MIN_CELLS_ACROSS = 2.5  # red-cell diameters a crop must span for its red cells to be measured
CROP_WORK_PX = 128  # granulometry raster for a crop: ~10 ms a crop; pooling makes up for the coarser steps


@dataclass(frozen=True)
class CropScale:
    """The scale a crop is read at and where it came from (recorded with the crop's result)."""

    um_per_px: float
    source: str  # user | file | red-cells | white-cell | bundle-default
    pooled: int = 1  # crops whose estimates were pooled (same pixel size)
    fallback: bool = False  # no estimate was possible: the bundle's training-crop scale was assumed
    estimated: float | None = None  # the estimate itself, where it was snapped to the training scale

    def to_record(self) -> dict:
        out = {"um_per_px": round(self.um_per_px, 5), "source": self.source, "pooled": self.pooled,
               "fallback": self.fallback}
        if self.estimated is not None:
            out["estimated_um_per_px"] = round(self.estimated, 5)
        return out


def nucleus_um_per_px(rgb: np.ndarray, nucleus_diameter_um: float) -> float | None:
    """Scale from the central nucleus's equivalent diameter (a rough, class-dependent fallback)."""
    areas, centres = stained_blobs(rgb)
    if not len(areas):
        return None
    h, w = rgb.shape[:2]
    area = float(areas[np.argmin(np.linalg.norm(centres - [(w - 1) / 2, (h - 1) / 2], axis=1))])
    if not 0.002 * h * w <= area <= 0.5 * h * w:  # a speck, or a crop that is all nucleus: nothing to measure
        return None
    return nucleus_diameter_um / (2.0 * np.sqrt(area / np.pi))


def red_cell_diameter_px(rgb: np.ndarray) -> float | None:
    """The crop's typical red-cell diameter in pixels (coarse granulometry, then refined on a raster
    scaled to the cells), or None where the crop has too little or too much cell cover to measure."""
    mask = foreground_mask(rgb)
    cover = float(mask.mean())
    coarse, _ = granulometric_diameter_px(mask, CROP_WORK_PX)
    if not (MIN_COVER <= cover <= 1 - MIN_COVER) or coarse <= 0:
        return None
    diameter = refined_diameter_px(mask, coarse)
    # a crop narrower than MIN_CELLS_ACROSS red cells holds no whole one to measure
    return diameter if diameter and min(rgb.shape[:2]) >= MIN_CELLS_ACROSS * diameter else None


class CropScaleEstimator:
    """Two passes over a run's crops: ``add`` each crop (its image is not kept), then ``scale`` of
    each by name. ``user_um_per_px`` (--um-per-px) overrides every estimate."""

    def __init__(self, bundle: ModelBundle, user_um_per_px: float | None = None):
        self.bundle, self.user = bundle, user_um_per_px
        ref = bundle.crop_scale_reference
        self.default = bundle.crop_um_per_px
        self.red_correction = float(ref.get("red_cell_correction", 1.0))
        self.nucleus_diameter_um = float(ref.get("nucleus_diameter_um", 7.0))
        self.estimators = bundle.crop_scale_estimators
        self._raw: dict[str, tuple[tuple[int, int], float | None, str]] = {}
        self._pooled: dict[tuple[int, str], tuple[float, int]] | None = None
        self._group: dict[tuple[int, int], int] = {}

    def add(self, name: str, rgb: np.ndarray, declared: float | None = None) -> None:
        """``declared``: the pixel size the file states (runtime/cells.declared_um_per_px), used as is."""
        self._pooled = None
        shape = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self.user:
            self._raw[name] = (shape, None, "user")
            return
        if declared:
            self._raw[name] = (shape, float(declared), "file")
            return
        diameter = red_cell_diameter_px(rgb) if "red-cells" in self.estimators else None
        if diameter:
            self._raw[name] = (shape, RED_CELL_DIAMETER_UM / diameter * self.red_correction, "red-cells")
            return
        est = nucleus_um_per_px(rgb, self.nucleus_diameter_um) if "white-cell" in self.estimators else None
        self._raw[name] = (shape, est, "white-cell") if est else (shape, None, "bundle-default")

    def _size_groups(self) -> dict[tuple[int, int], int]:
        """Crop shapes → group: sizes within SIZE_SPREAD of the group's smallest are one analyser's
        (crops are cut to the cell, so one scanner's differ by a few pixels)."""
        sides = sorted({max(shape) for shape, _, _ in self._raw.values()})
        group_of, first, group = {}, None, -1
        for side in sides:
            if first is None or side > first * SIZE_SPREAD:
                first, group = side, group + 1
            group_of[side] = group
        return {shape: group_of[max(shape)] for shape, _, _ in self._raw.values()}

    def _pool(self) -> dict[tuple[int, str], tuple[float, int]]:
        group = self._size_groups()
        groups: dict[tuple[int, str], list[float]] = {}
        for shape, est, source in self._raw.values():
            if est is not None:
                groups.setdefault((group[shape], source), []).append(est)
        self._group = group
        return {key: (float(np.median(v)), len(v)) for key, v in groups.items() if len(v) >= MIN_POOL}

    def scale(self, name: str) -> CropScale:
        if self.user:
            return CropScale(float(self.user), "user")
        if self._pooled is None:
            self._pooled = self._pool()
        shape, est, source = self._raw[name]
        if source == "file":
            return CropScale(est, "file")
        # A crop of a size whose red cells were measured on enough crops takes that pooled scale,
        # whatever its own estimate came from.
        for src in ("red-cells", "white-cell"):
            pooled = self._pooled.get((self._group[shape], src))
            if pooled is not None:
                return self._snapped(CropScale(_clamp(pooled[0]), src, pooled[1]))
        if est is not None:
            return self._snapped(CropScale(_clamp(est), source))
        return CropScale(self.default, "bundle-default", fallback=True)


    def _snapped(self, scale: CropScale) -> CropScale:
        if abs(scale.um_per_px / self.default - 1.0) <= SNAP:
            return CropScale(self.default, scale.source, scale.pooled, estimated=scale.um_per_px)
        return scale

    def summary(self) -> dict:
        """How the run's crops were scaled: crops per source, and the scale of each crop size."""
        sources: dict[str, int] = {}
        pooled: dict[str, float] = {}
        for name, (shape, _, _) in self._raw.items():
            scale = self.scale(name)
            sources[scale.source] = sources.get(scale.source, 0) + 1
            if scale.pooled > 1:
                pooled[f"{scale.source}, {scale.pooled} crops"] = round(scale.um_per_px, 5)
        return {"sources": sources, "pooled_um_per_px": pooled}


def _clamp(um_per_px: float) -> float:
    return float(min(max(um_per_px, UM_PER_PX_MIN), UM_PER_PX_MAX))


def estimate_crop_scales(paths: list[Path], bundle: ModelBundle, user_um_per_px: float | None,
                         read) -> tuple[CropScaleEstimator, list[dict]]:
    """The first pass over crop files: every readable crop added (``read(path)`` → RGB), failures
    returned as ``{"image", "error"}`` records for the caller to report."""
    from cytoedge.runtime.errors import CytoedgeError

    from cytoedge.runtime.cells import declared_um_per_px

    estimator, failures = CropScaleEstimator(bundle, user_um_per_px), []
    for path in paths:
        try:
            estimator.add(str(path), read(path), declared_um_per_px(path))
        except CytoedgeError as e:
            failures.append({"image": str(path), "error": str(e)})
    return estimator, failures


def crop_scales_or_raise(files: list[Path], bundle: ModelBundle, user_um_per_px: float | None) -> CropScaleEstimator:
    """The crop scales of a labelled set (evaluate, calibrate, adapt): the first unreadable crop stops the run."""
    from cytoedge.runtime.cells import read_crop
    from cytoedge.runtime.errors import InputImageError

    scales, failures = estimate_crop_scales(files, bundle, user_um_per_px, read_crop)
    if failures:
        raise InputImageError(failures[0]["error"] + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""))
    return scales
