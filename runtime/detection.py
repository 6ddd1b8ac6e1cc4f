"""Cell detection on a field: white cells (by their nucleus stain), platelets, and a red-cell count.

Romanowsky stains (May-Grünwald-Giemsa, Wright) colour nuclei and platelets blue-purple and red
cells pink, so the *nucleus signal* ``B − R`` separates them from red cells and plasma whatever the
brightness. A pixel is nuclear when its signal exceeds ``max(Otsu, floor)`` (the floor keeps a
field without white cells from thresholding noise). Nuclear blobs closer than ``merge_um`` are one
cell (a neutrophil's lobes); a group with at least ``white_min_nucleus_um2`` of nucleus is a white
cell, a lone small blob a platelet. The white cell's box is the nucleus box grown by
``cytoplasm_um`` on every side, squared up to at least ``white_min_diameter_um``.

Sizes are in µm, so the detector works at any pixel scale; it runs on the field resampled to
``work_um_per_px`` and reports in the input's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM, fill_holes, foreground_mask


@dataclass(frozen=True)
class DetectionSettings:
    work_um_per_px: float = 0.3
    signal_floor: float = 12.0  # B − R (uint8 units) below which nothing is nuclear
    signal_blur_um: float = 0.3  # Gaussian sigma on the signal: speckled chromatin reads as one nucleus
    # Nuclear blobs this close are one cell. 2.4 µm (was 1.6): BCCD F1 0.976 → 0.982 at fixed scale, 0.964 →
    # 0.974 at auto scale; bilobed PBC eosinophils no longer split in two (benchmarks/RESULTS.md, session 4).
    merge_um: float = 2.4
    white_min_nucleus_um2: float = 14.0
    platelet_area_um2: tuple[float, float] = (0.8, 14.0)
    cytoplasm_um: float = 1.6
    white_min_diameter_um: float = 9.0
    white_max_diameter_um: float = 30.0


@dataclass
class Detection:
    kind: str  # "white" or "platelet"
    cx: float
    cy: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in the input's pixels
    nucleus_area_um2: float
    # Convex hull of the cell's nuclear pixels (all its lobes), input px: where the cell is, for the reports.
    contour: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))


@dataclass
class FieldDetections:
    white: list[Detection]
    platelets: list[Detection]
    red_cell_count: int


def nucleus_signal(rgb: np.ndarray) -> np.ndarray:
    """``B − R`` as float32: high on stained nuclei and platelets, low on red cells and plasma."""
    return rgb[..., 2].astype(np.float32) - rgb[..., 0].astype(np.float32)


def _disc(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def nucleus_mask(rgb: np.ndarray, settings: DetectionSettings) -> np.ndarray:
    """uint8 0/1 mask of nuclear (and platelet) pixels."""
    signal = cv2.GaussianBlur(nucleus_signal(rgb), (0, 0), settings.signal_blur_um / settings.work_um_per_px)
    clipped = np.clip(signal, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(clipped, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (signal > max(float(otsu), settings.signal_floor)).astype(np.uint8)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(1))


def detect_cells(rgb: np.ndarray, um_per_px: float, settings: DetectionSettings = DetectionSettings(),
                 count_region: tuple[int, int, int, int] | None = None) -> FieldDetections:
    """White cells, platelets and an estimated red-cell count in one RGB uint8 field.

    ``count_region`` (x0, y0, x1, y1 in input px) limits the red-cell count to a tile's core.
    """
    factor = um_per_px / settings.work_um_per_px
    work = rgb if abs(factor - 1) < 1e-3 else cv2.resize(
        rgb, (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor))),
        interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    sx, sy = rgb.shape[1] / work.shape[1], rgb.shape[0] / work.shape[0]
    px_um = settings.work_um_per_px
    um2 = px_um * px_um
    nuclei = nucleus_mask(work, settings)
    groups = cv2.dilate(nuclei, _disc(settings.merge_um / 2 / px_um))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(groups, connectivity=8)
    white, platelets = [], []
    h, w = nuclei.shape
    for k in range(1, n):
        bx, by, bw, bh, _ = stats[k]
        inside = (labels[by:by + bh, bx:bx + bw] == k) & (nuclei[by:by + bh, bx:bx + bw] > 0)
        ys, xs = np.nonzero(inside)
        if xs.size == 0:
            continue
        xs, ys = xs + bx, ys + by
        area = xs.size * um2
        cx, cy = float(xs.mean()), float(ys.mean())
        if area >= settings.white_min_nucleus_um2:
            grow = settings.cytoplasm_um / px_um
            x0, x1 = xs.min() - grow, xs.max() + 1 + grow
            y0, y1 = ys.min() - grow, ys.max() + 1 + grow
            min_side = settings.white_min_diameter_um / px_um
            if x1 - x0 < min_side:
                x0, x1 = (x0 + x1 - min_side) / 2, (x0 + x1 + min_side) / 2
            if y1 - y0 < min_side:
                y0, y1 = (y0 + y1 - min_side) / 2, (y0 + y1 + min_side) / 2
            if max(x1 - x0, y1 - y0) * px_um > settings.white_max_diameter_um:
                continue
            box = (max(x0, 0) * sx, max(y0, 0) * sy, min(x1, w) * sx, min(y1, h) * sy)
            hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.float32))
            outline = ((hull.reshape(-1, 2) + 0.5) * (sx, sy) - 0.5).astype(np.float32)
            white.append(Detection("white", (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5, box, area, outline))
        elif settings.platelet_area_um2[0] <= area <= settings.platelet_area_um2[1]:
            r = np.sqrt(area / np.pi) / px_um + 1
            box = (max(cx - r, 0) * sx, max(cy - r, 0) * sy, min(cx + r + 1, w) * sx, min(cy + r + 1, h) * sy)
            platelets.append(Detection("platelet", (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5, box, area))
    if count_region is not None:
        x0, y0, x1, y1 = (int(round(count_region[0] / sx)), int(round(count_region[1] / sy)),
                          int(round(count_region[2] / sx)), int(round(count_region[3] / sy)))
        work, groups = work[y0:y1, x0:x1], groups[y0:y1, x0:x1]
    return FieldDetections(white, platelets, red_cell_count(work, groups, px_um) if work.size else 0)


def red_cell_count(rgb: np.ndarray, nuclear_groups: np.ndarray, um_per_px: float) -> int:
    """Red cells ≈ cell-covered area outside white cells / one red cell's area (touching cells included)."""
    cover = foreground_mask(rgb) & (1 - cv2.dilate(nuclear_groups, _disc(2.0 / um_per_px)))
    one_cell = np.pi * (RED_CELL_DIAMETER_UM / 2 / um_per_px) ** 2
    return int(round(cover.sum() / one_cell))


def stained_blobs(rgb: np.ndarray, floor: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Areas ``[M]`` (px) and centroids ``[M, 2]`` of the nucleus-stained blobs of a crop, found without
    knowing its scale (a blur of 1/300 of its side; ``nucleus_mask`` needs the scale)."""
    signal = cv2.GaussianBlur(nucleus_signal(rgb), (0, 0), max(1.0, max(rgb.shape[:2]) / 300))
    clipped = np.clip(signal, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(clipped, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (signal > max(float(otsu), floor)).astype(np.uint8)
    _, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    return stats[1:, cv2.CC_STAT_AREA].astype(np.float64), centroids[1:]


def holds_a_cell(rgb: np.ndarray, cell_type: str = "white", min_share: float = 0.001) -> bool:
    """Whether a single-cell crop shows the kind of cell a bundle reads near its centre: a blank,
    uniform, washed-out or plasma-only image does not, and is no cell to classify, whatever the
    denoiser's errors say. A white cell (or a platelet) is found by its stain: a nucleus-stained blob
    of at least ``min_share`` of the crop whose centre lies in the crop's central 60 %. A red cell has
    no nucleus: ``holds_a_red_cell``. Scale-free."""
    if cell_type == "red":
        return holds_a_red_cell(rgb)
    h, w = rgb.shape[:2]
    areas, centres = stained_blobs(rgb)
    return bool(np.any(_central(centres, w, h) & (areas >= min_share * h * w)))


def holds_a_red_cell(rgb: np.ndarray, min_share: float = 0.03, min_contrast: float = 12.0) -> bool:
    """Whether a crop shows a cell darker than the plasma near its centre: a region of the cell mask
    (green below Otsu, holes filled: a target cell's or a hypochromic cell's pale centre is cell) of at
    least ``min_share`` of the crop, centred in its central 60 %, and at least ``min_contrast`` grey
    levels (uint8 green) darker than the rest, so that Otsu splitting a blank image's noise finds none."""
    h, w = rgb.shape[:2]
    green = cv2.GaussianBlur(rgb[..., 1], (0, 0), max(1.0, max(h, w) / 100))
    thr, _ = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = fill_holes((green < thr).astype(np.uint8))
    if mask.all() or not mask.any() or green[mask == 0].mean() - green[mask == 1].mean() < min_contrast:
        return False
    _, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
    return bool(np.any(_central(centroids[1:], w, h) & (areas >= min_share * h * w)))


def _central(centres: np.ndarray, w: int, h: int) -> np.ndarray:
    return (centres[:, 0] >= 0.2 * w) & (centres[:, 0] <= 0.8 * w) & (centres[:, 1] >= 0.2 * h) & (centres[:, 1] <= 0.8 * h)


@dataclass(frozen=True)
class RedCellSettings:
    """Red-cell separation; sizes relative to the red-cell radius R at the slide's scale. Chosen on the
    tuning half of Chula RBC-12 (the content-hash half the benchmark does not measure; recall of labelled
    cells on every third of its 251 fields, benchmarks/bench_red_cells.py --half train); values tried in
    brackets. Before: plain distance maxima 1.4 R apart, cv2.watershed, areas 0.25-3: recall 0.876."""

    # A distance-transform maximum is a cell's centre when it rises this far above the saddle to any
    # higher one (h-maxima): touching discs whose centres are ≥ ~1.2 R apart have a saddle ≥ 0.2 R below
    # their peaks; a dent in one cell's outline makes a shallower one. The first height is used
    # everywhere; a region bigger than ``split_area`` red-cell areas is more than one cell (two discs
    # overlapping by up to 0.4 of a diameter cover over 1.3; a macrocyte 1.1 diameters across, 1.2) and
    # takes its markers again at the next height. [(0.2, 0.1, 0.05): recall 0.975, split 0.003;
    # (0.15, 0.07, 0.03): 0.976, split 0.004, 3 more detections a field; split_area 1.3 / 1.6: 0.975 /
    # 0.975, 2.0: 0.973 (an earlier build); 1.3 splits a touching chain of three that 1.6 leaves as two]
    peak_heights_radii: tuple[float, ...] = (0.2, 0.1, 0.05)
    split_area: float = 1.3
    # The separation runs with the red-cell radius resampled to this many px, the time growing as the
    # radius cubed: recall 0.975 / 0.974 at 8 / 12 px (79 / 316 ms a field; 6 px: 0.971, an earlier build).
    work_radius_px: float = 8.0
    # Region area in red-cell areas kept as one red cell: a fragment a third of the diameter across
    # (1/9 of the area) is kept; bigger than 3 is a clump the watershed could not cut. [floor 0.08 /
    # 0.15: recall 0.974 / 0.973, 106 / 102 detections a field; ceiling 3 / 4: within 0.001 (an earlier
    # build); before: 0.25, which dropped 3.0 % of the labelled cells as too small]
    area_range: tuple[float, float] = (0.08, 3.0)
    # The cell mask must be this much darker (uint8 green) than the rest of the field: Otsu splits blank
    # glass's noise into two halves a few levels apart, red cells are tens of levels darker than plasma.
    min_contrast: float = 8.0


def _h_maxima(dist: np.ndarray, h: float) -> np.ndarray:
    """One pixel per maximum of ``dist`` that rises at least ``h`` above the saddle to any higher one: where
    the reconstruction by dilation of ``dist − h`` under ``dist`` is its own seed. Equal heights (a flat
    ridge, two equal discs) are told apart by a tilt of under 1e-3 px, so a plateau or a tie gives one
    (the pixels where ``dist − reconstruction`` is exactly ``h`` would give both tops of two equal discs)."""
    tilt = np.arange(dist.size, dtype=np.float64).reshape(dist.shape) * (1e-3 / dist.size)
    seed = dist.astype(np.float64) - h + tilt
    ceiling = dist.astype(np.float64) + tilt
    rec, kernel = seed, np.ones((3, 3), np.uint8)
    while True:
        last = rec
        for _ in range(8):  # geodesic: one pixel a step, clamped at each (checked for a fixed point every 8)
            rec = np.minimum(cv2.dilate(rec, kernel), ceiling)
        if np.array_equal(rec, last):
            return (rec == seed) & (dist > 0)


def _flood(dist: np.ndarray, markers: np.ndarray, step: float = 0.5) -> np.ndarray:
    """Marker-controlled watershed of ``−dist``: the labelled markers grow into the pixels of ``dist ≥ t``
    for t falling by ``step``, so a basin gains a pixel from the marker whose flood reaches it first and two
    cells meet on their saddle. (cv2.watershed orders its flood by the difference between neighbours, the
    distance's slope, which is the same on a cell's flank as across a saddle; scipy's watershed_ift lets
    one marker take a neighbour's basin.)"""
    labels = markers.astype(np.float32)  # label ids stay exact below 2**24
    kernel, unset = np.ones((3, 3), np.uint8), np.float32(2 ** 24)
    for level, t in enumerate(np.arange(float(dist.max()), 0, -step)):
        free = (dist >= t) & (labels == 0)
        while free.any():
            # a pixel two floods reach together goes to the higher label at one level, the lower at the next,
            # so that neither side of a boundary creeps along it
            grown = cv2.dilate(labels, kernel) if level % 2 else \
                cv2.erode(np.where(labels > 0, labels, unset), kernel)
            take = free & (grown > 0) & (grown < unset)
            if not take.any():
                break
            labels[take] = grown[take]
            free &= ~take
    return labels.astype(np.int32)


def detect_red_cells(rgb: np.ndarray, um_per_px: float, exclude: np.ndarray | None = None,
                     settings: RedCellSettings = RedCellSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Red cells separated where they touch: watershed of the cell mask's distance transform from one
    marker per cell (its h-maxima: a maximum that a saddle of ``peak_heights_radii`` separates from any
    higher one), so each region of the mask has a marker and a dent does not split a cell; a region too big
    for one cell takes its markers again at the next, lower height. Returns the centres ``[N, 2]`` (x, y,
    input px) and the label image (0 = none, k + 1 = cell k). ``exclude``: a 0/1 mask of pixels that are
    not red cells (white cells, platelets)."""
    radius = RED_CELL_DIAMETER_UM / 2 / um_per_px
    if exclude is not None and exclude.any() and not exclude.all():
        # Excluded pixels (white cells: the darkest in a field) would take the "dark" side of the threshold
        # and leave the red cells with the plasma; they are painted plasma-bright first.
        rgb = rgb.copy()
        rgb[exclude > 0] = np.percentile(rgb[exclude == 0], 95, axis=0).astype(np.uint8)
    cells = foreground_mask(rgb)
    if exclude is not None:
        cells = cells & (1 - exclude.astype(np.uint8))
    green = rgb[..., 1]
    if not cells.any() or cells.all() or \
            float(green[cells == 0].mean()) - float(green[cells == 1].mean()) < settings.min_contrast:
        return np.zeros((0, 2)), np.zeros(cells.shape, np.int32)  # glass: Otsu split its noise
    # separated with the radius resampled to ``work_radius_px`` (the cost grows as its cube), labelled at full size
    f = min(1.0, settings.work_radius_px / radius)
    size = (max(1, round(cells.shape[1] * f)), max(1, round(cells.shape[0] * f)))
    work = cells if f == 1 else \
        (cv2.resize(cells.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(work, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    one = np.pi * radius * radius
    peaks, again = np.zeros(work.shape, bool), work > 0
    for h in settings.peak_heights_radii:
        peaks[again] = _h_maxima(dist, h * radius * f)[again]
        n, markers = cv2.connectedComponents(peaks.astype(np.uint8))
        labels = _flood(dist, markers)
        if f < 1:
            labels = cv2.resize(labels, (cells.shape[1], cells.shape[0]), interpolation=cv2.INTER_NEAREST) * cells
        area = np.bincount(labels.ravel(), minlength=n)
        big = (area > settings.split_area * one)[labels] & (labels > 0)
        if not big.any():
            break
        again = big if f == 1 else cv2.resize(big.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    keep = (area >= settings.area_range[0] * one) & (area <= settings.area_range[1] * one)
    keep[0] = False
    ys, xs = np.nonzero(keep[labels])
    ids = labels[ys, xs]
    order = np.flatnonzero(keep)
    count = np.bincount(ids, minlength=n)[order]
    centres = np.stack([np.bincount(ids, xs, n)[order] / count, np.bincount(ids, ys, n)[order] / count], 1)
    relabel = np.zeros(n, np.int32)
    relabel[order] = np.arange(1, len(order) + 1)
    return centres.reshape(-1, 2), relabel[labels]
