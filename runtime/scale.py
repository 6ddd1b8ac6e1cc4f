"""Pixel scale of a field: given (DICOM pixel spacing, --um-per-px) or estimated from red cells.

A normal red cell is about 7.5 µm across, the one size on a smear that barely varies between
people, so when a field comes without a scale the typical red-cell diameter fixes it. Everything after this is done in µm and resampled to the bundle's pixel scale.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from cytoedge.runtime.errors import InputImageError

log = logging.getLogger(__name__)

RED_CELL_DIAMETER_UM = 7.5
MIN_COVER = 0.03  # a field with less (or more than 1 - this) cell cover has nothing to measure


@dataclass(frozen=True)
class ScaleEstimate:
    um_per_px: float
    source: str  # "dicom", "user", "red-cell-granulometry"
    median_diameter_px: float = 0.0


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background (a red cell's pale centre) in a uint8 0/1 mask."""
    padded = np.pad(mask, 1).astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 1)
    return (padded | (1 - flood))[1:-1, 1:-1]


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """Cells (anything darker than the glass/plasma in green), holes filled, as uint8 0/1."""
    green = cv2.GaussianBlur(rgb[..., 1], (3, 3), 0)
    thr, _ = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return fill_holes((green < thr).astype(np.uint8))


def granulometric_diameter_px(mask: np.ndarray, work_px: int = 256, radii: np.ndarray | None = None,
                              factor: float | None = None) -> tuple[float, float]:
    """Typical cell diameter (px) of a mask by granulometry, and the share of the mask it explains.

    Opening with discs of growing radius r removes the cells narrower than 2r; the area lost per
    step (the pattern spectrum) is spread around the red-cell radius even where cells touch (a
    clump of discs of radius R survives opening by any smaller disc). Its area-weighted median is
    taken, so a few big white cells or clumps do not win. The mask is resampled by ``factor``
    (default: to ``work_px`` on its long side) and opened with ``radii`` (default 1 .. work_px/6).
    """
    f = work_px / max(mask.shape) if factor is None else factor
    small = cv2.resize(mask, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST)
    radii = np.arange(1, work_px // 6) if radii is None else radii
    areas = np.array([cv2.morphologyEx(small, cv2.MORPH_OPEN,
                                       cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).sum()
                      for r in radii], np.float64)
    spectrum = -np.diff(areas)
    if areas[0] <= 0 or spectrum.sum() <= 0:
        return 0.0, 0.0
    cum = np.cumsum(spectrum) / spectrum.sum()
    k = int(np.searchsorted(cum, 0.5))
    # within bin k (cells of radius radii[k] .. radii[k] + 1) the median lies where the cumulative share
    # crosses 0.5: interpolated, so the estimate does not move in whole steps of the work raster
    below = cum[k - 1] if k else 0.0
    within = (0.5 - below) / max(cum[k] - below, 1e-12)
    return 2.0 * (radii[k] + within) / f, float(spectrum.sum() / areas[0])


def refined_diameter_px(mask: np.ndarray, coarse_px: float, cell_px: float = 24.0) -> float:
    """The granulometric diameter again, on the mask resampled so the cells are ``cell_px`` across and
    with radii from half to 1.6 times theirs: the raster is the same relative to the cells at any
    pixel size, so the estimate is, and white cells (twice as wide) no longer weigh in."""
    half = cell_px / 2
    diameter, _ = granulometric_diameter_px(mask, radii=np.arange(int(half * 0.5), int(half * 1.6) + 2),
                                            factor=cell_px / coarse_px)
    return diameter


def estimate_um_per_px(rgb: np.ndarray, name: str = "field") -> ScaleEstimate:
    """Scale from the typical red-cell diameter (≈ 7.5 µm), found by granulometry of the cell mask."""
    mask = foreground_mask(rgb)
    cover = float(mask.mean())
    diameter, _ = granulometric_diameter_px(mask)
    if not (MIN_COVER <= cover <= 1 - MIN_COVER) or diameter <= 0:
        raise InputImageError(f"{name}: pixel scale unknown and no red cells to estimate it from "
                              f"({cover:.0%} of the field is cells); pass --um-per-px")
    return ScaleEstimate(float(RED_CELL_DIAMETER_UM / diameter), "red-cell-granulometry", float(diameter))


def resolve_scale(rgb_sample: np.ndarray | None, user_um_per_px: float | None, file_um_per_px: float | None,
                  name: str) -> ScaleEstimate:
    """The user's scale beats the file's, which beats the red-cell estimate from ``rgb_sample``."""
    if user_um_per_px:
        return ScaleEstimate(float(user_um_per_px), "user")
    if file_um_per_px:
        return ScaleEstimate(float(file_um_per_px), "dicom")
    if rgb_sample is None:
        raise InputImageError(f"{name}: pixel scale unknown and no pixels to estimate it from; pass --um-per-px")
    est = estimate_um_per_px(rgb_sample, name)
    log.info("%s: %.4f µm/px estimated (red-cell diameter %.1f px)", name, est.um_per_px, est.median_diameter_px)
    return est
