"""A lab's labelled cells as the estimator will meet them: ``DIR/<class>/<image>`` read the way
``classify`` reads crops, or the way ``score`` reads fields (one white cell each), into CellBatches.

Adapting to a site only helps if the adapted numbers are fitted on exactly the pixels the commands
will later feed the model, so this module reuses their readers rather than a copy of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.errors import CytoedgeError

CHUNK = 64


@dataclass
class SiteCells:
    batches: list[CellBatch]
    labels: np.ndarray          # class id per cell, in batch order
    files: list[Path]           # the image each cell came from
    skipped: list[dict] = field(default_factory=list)  # {"image", "reason"}: fields not holding one white cell
    scale: dict = field(default_factory=dict)          # how the pixel size was found


def labelled_folder(root: Path, bundle: ModelBundle) -> tuple[list[Path], np.ndarray]:
    """The images of ``root/<class>/`` for the classes present (any subset of the bundle's); a folder
    that is not one of the bundle's classes is refused, naming it."""
    from cytoedge.runtime.labelled_data import list_labelled_files

    root = Path(root)
    if not root.is_dir():
        raise CytoedgeError(f"labelled data folder {root} does not exist (expected {root}/<class>/<image>)")
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = [c for c in present if c not in bundle.class_names]
    if unknown:
        raise CytoedgeError(f"{root}: folder(s) {unknown} are not classes of {bundle.name} "
                            f"({', '.join(bundle.class_names)}); rename or remove them")
    classes = [c for c in bundle.class_names if c in present]
    files, labels, _ = list_labelled_files(root, classes)
    ids = np.array([bundle.class_names.index(classes[k]) for k in labels], np.int64)
    return files, ids


def data_sha256(files: list[Path], labels: np.ndarray, class_names: list[str]) -> str:
    """One hash of the labelled data: every (class, file content hash) pair, sorted."""
    pairs = sorted(f"{class_names[k]}/{hashlib.sha256(Path(f).read_bytes()).hexdigest()}" for f, k in zip(files, labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def crop_batches(bundle: ModelBundle, files: list[Path], scales) -> Iterator[CellBatch]:
    """The crops of ``files`` as CellBatches of CHUNK, each at its estimated scale (``scales``: a
    CropScaleEstimator), read lazily (calibrate streams them; adapt keeps them)."""
    from cytoedge.runtime.cells import crops_to_batch, read_crop

    for s in range(0, len(files), CHUNK):
        chunk = files[s:s + CHUNK]
        yield crops_to_batch([read_crop(f) for f in chunk], bundle, [scales.scale(str(f)).um_per_px for f in chunk],
                             [str(f) for f in chunk])


def crop_cells(files: list[Path], labels: np.ndarray, bundle: ModelBundle, um_per_px: float | None) -> SiteCells:
    """Single-cell crops, each at its estimated scale, as ``classify`` reads them."""
    from cytoedge.runtime.crop_scale import crop_scales_or_raise

    scales = crop_scales_or_raise(files, bundle, um_per_px)
    return SiteCells(list(crop_batches(bundle, files, scales)), labels, list(files), scale=scales.summary())


def field_cells(files: list[Path], labels: np.ndarray, bundle: ModelBundle, backend, options) -> SiteCells:
    """Fields with one white cell each, read by ``score``'s own SlideScorer (scale, detection, stain
    map): fields where it finds no white cell, or several, are skipped and listed."""
    from cytoedge.runtime.classify_cells import classify_batch
    from cytoedge.runtime.slide_scoring import SlideScorer
    from cytoedge.runtime.sources import open_source

    seen: list[CellBatch] = []

    def keep_batch(batch, *args):
        seen.append(batch)
        return classify_batch(batch, *args)

    scorer = SlideScorer(bundle, backend, "fast", options, classify=keep_batch)
    batches, kept, used, skipped, sources = [], [], [], [], {}
    for path, label in zip(files, labels):
        seen.clear()
        try:
            cells = list(scorer.score_source(open_source(path)))
        except CytoedgeError as e:
            skipped.append({"image": str(path), "reason": str(e)})
            continue
        if len(cells) != 1:
            skipped.append({"image": str(path), "reason": f"{len(cells)} white cells found; a labelled field needs one"})
            continue
        batches.append(seen[0].subset(np.arange(1)))
        kept.append(int(label))
        used.append(path)
        source = scorer.state.scale.source
        sources[source] = sources.get(source, 0) + 1
    return SiteCells(merged(batches), np.array(kept, np.int64), used, skipped, {"fields_by_scale_source": sources})


def merged(batches: list[CellBatch], size: int = CHUNK) -> list[CellBatch]:
    """Consecutive batches joined into batches of about ``size`` cells (tile indices renumbered), so the
    backend sees full batches rather than one field's cell at a time."""
    out, tiles, rows = [], [], []
    for batch in batches:
        table = batch.cells.copy()
        table[:, 0] += len(tiles)
        tiles.extend(batch.tiles)
        rows.append(table)
        if sum(len(r) for r in rows) >= size:
            out.append(CellBatch(tiles, np.concatenate(rows)))
            tiles, rows = [], []
    if rows:
        out.append(CellBatch(tiles, np.concatenate(rows)))
    return out
