"""Chula RBC-12 red-cell crops for training, calibration and measurement of the red-cell bundle.

    python -m cytoedge.training.rbc_data --data ../shared/data/chula_rbc12 --half train --out .cache/chula-train

Chula labels a centre point and one of 13 classes for each of a subset of a field's red cells. One
square crop is cut per labelled cell and written as a labelled folder (``OUT/<class>/<field>_<k>.png``),
the layout the trainer, ``cytoedge calibrate`` and ``cytoedge evaluate`` read.

Scale. Two of the classes (macrocyte, microcyte) are sizes, so each field must not be scaled by its own
red cells: a field of macrocytes would be shrunk to normal size. The per-field granulometric estimate
(runtime/scale.py) spreads 0.18-0.28 µm/px (5-95 %) over Chula's fields, and the spread follows the
labels (fields with over 30 % macrocytes: median 0.181; fields with none: 0.231), while the fields
whose labelled cells are at least 80 % normal agree within ±3 % (0.2234 µm/px, 19 training-half fields):
one microscope and camera, whose scale the normal fields measure. Every field is therefore read at
that one dataset scale, ``CHULA_UM_PER_PX``, and ``dataset_um_per_px`` re-measures it.

The crops are kept at the source resolution with the scale declared in the PNG (pHYs), so a crop is
read exactly as a user's crop from that microscope would be, and are cut ``CROP_SOURCE_PX`` wide: the
model's 32-px input at 2 source px per model px (0.447 µm/px: 14.3 µm, one 7.5-µm red cell, a
macrocyte or the tail of a teardrop with a margin) plus room to rotate it.

The fields are split by content hash (``held_out``); the measured half is never cut for training.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.cells import read_rgb, write_image_with_scale
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.scale import estimate_um_per_px

log = logging.getLogger(__name__)

# Chula's class ids 0..12, in order.
CHULA_CLASSES = ["normal", "macrocyte", "microcyte", "spherocyte", "target_cell", "stomatocyte", "ovalocyte",
                 "teardrop", "burr_cell", "schistocyte", "uncategorised", "hypochromia", "elliptocyte"]
# Median granulometric scale of the training-half fields whose labelled cells are >= 80 % normal
# (19 fields, spread ±3 %); see the module docstring and ``dataset_um_per_px``.
CHULA_UM_PER_PX = 0.2234
SOURCE_PX_PER_MODEL_PX = 2
CROP_SOURCE_PX = 96  # 48 model px: the 32-px input rotated by any angle (32·√2 = 45) fits
NORMAL_SHARE_FOR_SCALE = 0.8


def field_part(image_bytes: bytes) -> str:
    """Which part a field belongs to, from the sha256 of its file's bytes: "train" (even first byte), or of
    the held-out half never trained on, "calibration" (second byte divisible by 3: a third, to calibrate on
    cells the model never saw) or "measure" (the rest)."""
    digest = hashlib.sha256(image_bytes).digest()
    if digest[0] % 2 == 0:
        return "train"
    return "calibration" if digest[1] % 3 == 0 else "measure"


def held_out(image_bytes: bytes) -> bool:
    """The half never trained on."""
    return field_part(image_bytes) != "train"


HALVES = {"train": {"train"}, "held-out": {"calibration", "measure"}, "calibration": {"calibration"},
          "measure": {"measure"}, "all": {"train", "calibration", "measure"}}
SPLIT_RULE = "sha256(field file bytes)[0] odd -> held-out; of those, [1] % 3 == 0 -> calibration, the rest measure"


def field_files(data_root: Path, half: str) -> list[Path]:
    """Chula fields of one part, sorted by name: "train", "held-out" (never trained on), its "calibration"
    third and the "measure" rest, or "all"."""
    if half not in HALVES:
        raise CytoedgeError(f"half must be one of {', '.join(HALVES)}; got {half!r}")
    images = Path(data_root) / "images"
    if not images.is_dir():
        raise CytoedgeError(f"{data_root}: not a Chula RBC-12 folder (no images/ inside)")
    fields = sorted(images.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
    return fields if half == "all" else [p for p in fields if field_part(p.read_bytes()) in HALVES[half]]


def read_labels(data_root: Path, field: Path) -> list[tuple[float, float, int]]:
    """The labelled cells of a field: (x, y, class id); a field without a label file has none."""
    path = Path(data_root) / "labels" / f"{field.stem}.txt"
    if not path.is_file():
        return []
    cells = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            x, y, k = float(parts[0]), float(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise CytoedgeError(f"{path}:{n}: expected 'x y class', got {line!r}") from None
        if not 0 <= k < len(CHULA_CLASSES):
            raise CytoedgeError(f"{path}:{n}: class {k} is not one of Chula's 0..{len(CHULA_CLASSES) - 1}")
        cells.append((x, y, k))
    return cells


def cut_crops(rgb: np.ndarray, centres: list[tuple[float, float]], size: int) -> list[np.ndarray]:
    """A ``size``-px square crop around each (x, y), whose pixel (rounded) lands at ``size // 2``; the field
    is mirrored at its edges (as the trainer's augmentation is) for cells near them."""
    pad = size
    padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    crops = []
    for x, y in centres:
        x0, y0 = int(round(x)) + pad - size // 2, int(round(y)) + pad - size // 2
        crops.append(np.ascontiguousarray(padded[y0:y0 + size, x0:x0 + size]))
    return crops


def dataset_um_per_px(data_root: Path, half: str = "train") -> tuple[float, int, float]:
    """The dataset's scale re-measured: median per-field estimate over the fields whose labelled cells
    are mostly normal, the number of such fields, and their relative spread (std / mean)."""
    estimates = []
    for field in field_files(data_root, half):
        labels = [k for _, _, k in read_labels(data_root, field)]
        if labels and np.mean(np.equal(labels, 0)) >= NORMAL_SHARE_FOR_SCALE:
            estimates.append(estimate_um_per_px(read_rgb(field), str(field)).um_per_px)
    if not estimates:
        raise CytoedgeError(f"{data_root}: no {half} field has >= {NORMAL_SHARE_FOR_SCALE:.0%} normal cells")
    e = np.array(estimates)
    return float(np.median(e)), len(e), float(e.std() / e.mean())


def write_crops(data_root: Path, out: Path, half: str, per_class: int | None = None, seed: int = 0) -> dict[str, int]:
    """Cut every labelled cell of ``half``'s fields into ``out/<class>/<field>_<k>.png`` at the source
    resolution, declaring CHULA_UM_PER_PX; at most ``per_class`` random cells per class. Returns the counts."""
    cells = [(field, k, x, y, c) for field in field_files(data_root, half)
             for k, (x, y, c) in enumerate(read_labels(data_root, field))]
    if per_class is not None:
        rng = np.random.default_rng(seed)
        by_class = [[cell for cell in cells if cell[4] == c] for c in range(len(CHULA_CLASSES))]
        cells = [by[i] for by in by_class for i in sorted(rng.permutation(len(by))[:per_class])]
    for name in CHULA_CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(CHULA_CLASSES, 0)
    fields: dict[Path, list[tuple[int, float, float, int]]] = {}
    for field, k, x, y, c in cells:
        fields.setdefault(field, []).append((k, x, y, c))
    for field, items in fields.items():
        crops = cut_crops(read_rgb(field), [(x, y) for _, x, y, _ in items], CROP_SOURCE_PX)
        for (k, _, _, c), crop in zip(items, crops):
            write_image_with_scale(out / CHULA_CLASSES[c] / f"{field.stem}_{k:03d}.png", crop, CHULA_UM_PER_PX)
            counts[CHULA_CLASSES[c]] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/chula_rbc12"))
    p.add_argument("--half", choices=[h for h in HALVES if h != "all"], default="train")
    p.add_argument("--out", type=Path, required=True, help="labelled folder to write (never inside the repository)")
    p.add_argument("--per-class", type=int, help="at most this many random cells of each class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    measured, n, spread = dataset_um_per_px(args.data)
    log.info("dataset scale re-measured: %.4f µm/px over %d mostly-normal training fields (spread %.1f %%); "
             "crops declare %.4f", measured, n, 100 * spread, CHULA_UM_PER_PX)
    counts = write_crops(args.data, args.out, args.half, args.per_class, args.seed)
    (args.out / "dataset.json").write_text(json.dumps({
        "source": str(args.data), "half": args.half, "split": SPLIT_RULE,
        "um_per_px": CHULA_UM_PER_PX, "remeasured_um_per_px": round(measured, 4), "scale_fields": n,
        "crop_px": CROP_SOURCE_PX, "per_class": args.per_class, "seed": args.seed, "counts": counts}, indent=2))
    log.info("wrote %d crops to %s: %s", sum(counts.values()), args.out, counts)


if __name__ == "__main__":
    main()
