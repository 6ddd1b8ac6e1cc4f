"""Red-cell detection on Chula RBC-12 fields: do the labelled cells each get one detection?

  python benchmarks/bench_red_cells.py [--data ../shared/data/chula_rbc12] [--write]

The fields are split by content hash (training/rbc_data.held_out: odd first byte of the file's sha256: the half measured here,
kept for measurement; the settings were chosen beforehand on 30 random fields of either half). Chula labels a subset of each field's red cells (a centre
point and a class), not all of them, so precision cannot be measured against them: the numbers are
the recall of labelled cells (a labelled centre inside a detected cell's region, each region used
once), the share of labelled cells split in two (two detected centres within half a red-cell radius
of the label), and detections per field beside labels per field. The
pixel scale of each field is estimated from its red cells, as `cytoedge score` does.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.detection import detect_red_cells
from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM, estimate_um_per_px
from cytoedge.training.rbc_data import field_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chula_rbc12"))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"{args.data}: not here (real data is not shipped); nothing to measure", file=sys.stderr)
        return 0
    fields = sorted(field_files(args.data, "held-out"))  # the half the red-cell model is not trained on
    found = labelled = split = detections = 0
    seconds = 0.0
    for path in fields:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        points = [tuple(map(float, line.split()[:2])) for line in (args.data / "labels" / f"{path.stem}.txt")
                  .read_text().splitlines() if line.strip()]
        t0 = time.perf_counter()
        um = estimate_um_per_px(rgb, str(path)).um_per_px
        centres, labels = detect_red_cells(rgb, um)
        seconds += time.perf_counter() - t0
        radius = RED_CELL_DIAMETER_UM / 2 / um
        used: set[int] = set()
        for x, y in points:
            k = int(labels[int(np.clip(y, 0, labels.shape[0] - 1)), int(np.clip(x, 0, labels.shape[1] - 1))])
            if k and k not in used:
                used.add(k)
                found += 1
            near = np.hypot(centres[:, 0] - x, centres[:, 1] - y) < radius / 2 if len(centres) else np.zeros(0, bool)
            split += int(near.sum() > 1)
        labelled += len(points)
        detections += len(centres)
    n = len(fields)
    body = (f"Measured half of `{args.data}` ({n} fields of 640×480, split by content hash; the settings in "
            "`runtime/detection.RedCellSettings` were chosen beforehand on 30 random fields of either half). Watershed of the cell mask's distance transform, "
            "one marker per distance maximum, scale from each field's red cells.\n\n"
            "| measure | result |\n|---|---|\n"
            f"| labelled red cells found (label inside a detected cell, one each) | **{found / labelled:.3f}** "
            f"({found} of {labelled}) |\n"
            f"| labelled cells split in two (two centres within half a radius) | {split / labelled:.3f} |\n"
            f"| detections per field / labelled cells per field | {detections / n:.1f} / {labelled / n:.1f} "
            "(Chula labels a subset of each field's cells, so precision is not measured) |\n"
            f"| time per field (scale estimate + detection) | {seconds / n * 1000:.0f} ms |\n")
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("red-cells", "Red-cell detection (Chula RBC-12)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
