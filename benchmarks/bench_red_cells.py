"""Red-cell detection on Chula RBC-12 fields: do the labelled cells each get one detection, and why not?

  python benchmarks/bench_red_cells.py [--data ../shared/data/chula_rbc12] [--half held-out|train] [--write]

The fields are split by content hash (training/rbc_data.held_out: odd first byte of the file's sha256).
``held-out`` (the default) is the measured half, kept for measurement; ``train`` is the tuning half, the
one ``runtime/detection.RedCellSettings`` was chosen on and the only one to analyse misses on. Chula labels
a subset of each field's red cells (a centre point and a class), not all of them, so precision cannot be
measured against them. Reported:

- recall: a labelled centre inside a detected cell's region, each region used once; by class, by
  contrast with the plasma, and the misses by cause (the first that applies: the point is not in the cell
  mask; its region is below the area floor; its region is a clump above the ceiling; its region already
  holds another labelled point);
- split: labelled cells with two detected centres within half a red-cell radius of the point;
- precision proxies, each named for what it measures: detections that are mostly nucleus-stained (white
  cell or platelet material counted as a red cell: false whatever the labels), and, of the detections
  centred within one red-cell radius of a labelled point (where a labelled cell is, so a detection there
  is that cell or a piece of it, rarely an unlabelled neighbour), the share whose region holds a labelled
  point (no field's labels are complete enough to measure precision over the whole field: Chula labels
  about a third of the cells);
- labelled cells inside white-cell or platelet boxes (runtime/detection.detect_cells), pixels the slide's
  red-cell reader paints out (runtime/red_cells.py); this benchmark detects without them.

The pixel scale of each field is estimated from its red cells, as `cytoedge score` does.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.detection import DetectionSettings, RedCellSettings, detect_cells, detect_red_cells, nucleus_mask
from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM, estimate_um_per_px, foreground_mask
from cytoedge.training.rbc_data import CHULA_CLASSES, field_files, read_labels

STAINED = 0.25  # share of a detection's pixels nucleus-stained at which it is a white cell's or platelet's
CAUSES = ("not in the cell mask (pale, or a pale centre open to the plasma)", "region below the area floor",
          "clump above the area ceiling (not split)", "region shared with another labelled cell (not split)",
          "other (in the mask, in no region)")
CONTRAST_BINS = ("below 15", "15 to 30", "30 and above")  # plasma green minus the labelled point's, uint8 levels


def _boxes(shape: tuple[int, int], rgb: np.ndarray, um: float) -> np.ndarray:
    """0/1 mask of the white-cell and platelet boxes, the pixels the slide's red-cell reader excludes."""
    det = detect_cells(rgb, um)
    mask = np.zeros(shape, np.uint8)
    for d in det.white + det.platelets:
        x0, y0, x1, y1 = (max(int(round(v)), 0) for v in d.bbox)
        mask[y0:y1, x0:x1] = 1
    return mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chula_rbc12"))
    ap.add_argument("--half", choices=("held-out", "train"), default="held-out")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.write and args.half != "held-out":
        ap.error("--write records the measured half only")
    if not args.data.is_dir():
        print(f"{args.data}: not here (real data is not shipped); nothing to measure", file=sys.stderr)
        return 0
    fields = field_files(args.data, args.half)
    unfiltered = dataclasses.replace(RedCellSettings(), area_range=(1e-9, float("inf")))  # every region kept
    labelled, found, causes, at_edge = Counter(), Counter(), Counter(), 0
    by_contrast, found_contrast = Counter(), Counter()
    split = detections = stained = boxed = 0
    near_labels = near_holding = 0
    seconds = 0.0
    for path in fields:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        points = read_labels(args.data, path)
        t0 = time.perf_counter()
        um = estimate_um_per_px(rgb, str(path)).um_per_px
        centres, labels = detect_red_cells(rgb, um)
        seconds += time.perf_counter() - t0
        _, raw = detect_red_cells(rgb, um, settings=unfiltered)  # the regions before the area filter
        radius = RED_CELL_DIAMETER_UM / 2 / um
        one = np.pi * radius * radius
        mask = foreground_mask(rgb)
        raw_area = np.bincount(raw.ravel())
        green = cv2.GaussianBlur(rgb[..., 1], (0, 0), max(1.0, radius / 4)).astype(np.float64)
        plasma = float(np.median(green[mask == 0])) if (mask == 0).any() else 255.0
        boxes = _boxes(mask.shape, rgb, um)
        h, w = labels.shape
        used: set[int] = set()
        for x, y, k in points:
            xi, yi = int(np.clip(x, 0, w - 1)), int(np.clip(y, 0, h - 1))
            cls, region = CHULA_CLASSES[k], int(labels[yi, xi])
            contrast = CONTRAST_BINS[int(np.searchsorted((15, 30), plasma - green[yi, xi], side="right"))]
            labelled[cls] += 1
            by_contrast[contrast] += 1
            boxed += int(boxes[yi, xi])
            if region and region not in used:
                used.add(region)
                found[cls] += 1
                found_contrast[contrast] += 1
            else:
                r = int(raw[yi, xi])
                cause = (0 if not mask[yi, xi] else 1 if r and raw_area[r] < RedCellSettings().area_range[0] * one
                         else 2 if r and raw_area[r] > RedCellSettings().area_range[1] * one else 3 if region else 4)
                causes[CAUSES[cause]] += 1
                at_edge += int(min(x, y, w - 1 - x, h - 1 - y) < radius)
            near = np.hypot(centres[:, 0] - x, centres[:, 1] - y) < radius / 2 if len(centres) else np.zeros(0, bool)
            split += int(near.sum() > 1)
        detections += len(centres)
        if len(centres):
            nuclear = nucleus_mask(rgb, DetectionSettings())
            share = np.bincount(labels.ravel(), nuclear.ravel().astype(np.float64), len(centres) + 1)[1:] / \
                np.maximum(np.bincount(labels.ravel(), minlength=len(centres) + 1)[1:], 1)
            stained += int((share >= STAINED).sum())
        if len(centres) and points:
            xy = np.array([(x, y) for x, y, _ in points])
            near = np.hypot(centres[:, None, 0] - xy[None, :, 0], centres[:, None, 1] - xy[None, :, 1]).min(1) < radius
            holding = np.isin(np.arange(1, len(centres) + 1), list(used))
            near_labels += int(near.sum())
            near_holding += int((near & holding).sum())
    n, total, hits = len(fields), sum(labelled.values()), sum(found.values())
    missed = total - hits
    half = "Measured half" if args.half == "held-out" else "Tuning half (the settings were chosen on it)"
    body = (f"{half} of `{args.data}` ({n} fields of 640×480, split by content hash). Watershed of the cell "
            "mask's distance transform from its h-maxima (runtime/detection.detect_red_cells), scale from each "
            "field's red cells.\n\n"
            "| measure | result |\n|---|---|\n"
            f"| labelled red cells found (label inside a detected cell, one each) | **{hits / total:.3f}** "
            f"({hits} of {total}) |\n"
            f"| labelled cells split in two (two centres within half a radius) | {split / total:.4f} |\n"
            f"| detections per field / labelled cells per field | {detections / n:.1f} / {total / n:.1f} |\n"
            f"| precision proxy: detections ≥ {STAINED:.0%} nucleus-stained (white-cell or platelet material) | "
            f"{stained / max(detections, 1):.4f} ({stained} of {detections}) |\n"
            "| precision proxy: detections centred within a radius of a labelled point that hold one | "
            f"{near_holding / max(near_labels, 1):.3f} ({near_holding} of {near_labels}) |\n"
            f"| labelled cells inside white-cell/platelet boxes (the slide's reader paints these out) | "
            f"{boxed / total:.4f} ({boxed}) |\n"
            f"| time per field (scale estimate + detection) | {seconds / n * 1000:.0f} ms |\n\n"
            f"Misses by cause ({missed}; {at_edge} of them within a radius of the field's edge):\n\n"
            "| cause | misses | share of labelled |\n|---|---|---|\n"
            + "".join(f"| {c} | {causes[c]} | {causes[c] / total:.4f} |\n" for c in CAUSES)
            + "\nRecall by class:\n\n| class | labelled | found | recall |\n|---|---|---|---|\n"
            + "".join(f"| {c} | {labelled[c]} | {found[c]} | {found[c] / labelled[c]:.3f} |\n"
                      for c in CHULA_CLASSES if labelled[c])
            + "\nRecall by contrast (plasma green minus the green at the labelled point, uint8 levels):\n\n"
            "| contrast | labelled | recall |\n|---|---|---|\n"
            + "".join(f"| {b} | {by_contrast[b]} | {found_contrast[b] / max(by_contrast[b], 1):.3f} |\n"
                      for b in CONTRAST_BINS))
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("red-cells", "Red-cell detection (Chula RBC-12)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
