"""A lab's labelled cells as the estimator will meet them: ``DIR/<class>/<image>`` read the way
``classify`` reads crops, or the way ``score`` reads fields (one white cell each), or the cells a
reader labelled on review pages, cut again from their slides as ``score`` cuts them, into CellBatches.

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

    def batches_of(self, index: np.ndarray) -> list[CellBatch]:
        """The cells at ``index`` (in batch order) as CellBatches holding only their tiles."""
        starts = np.cumsum([0] + [len(b) for b in self.batches])
        out = []
        for b, batch in enumerate(self.batches):
            rows = [int(i - starts[b]) for i in np.sort(index) if starts[b] <= i < starts[b + 1]]
            if rows:
                out.append(compact(batch, rows))
        return out


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
    """One hash of the labelled data: every (class, file content hash) pair, sorted (a slide several
    reviewed cells come from is read once)."""
    from cytoedge.runtime.bundle import sha256_file

    digests = {f: sha256_file(Path(f)) for f in set(files)}
    pairs = sorted(f"{class_names[k]}/{digests[f]}" for f, k in zip(files, labels))
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


def reviewed_labels(paths: list[Path], bundle: ModelBundle, per_class: int | None = None,
                    seed: int = 0) -> tuple[list, np.ndarray]:
    """The review exports at ``paths``, reduced to at most ``per_class`` reviewed cells of each label
    (a ``seed`` draw, before any slide is read), and those cells' class ids."""
    import dataclasses

    from cytoedge.runtime.labelled_data import stratified_subset
    from cytoedge.runtime.review_export import load_review_export

    exports = [load_review_export(p) for p in paths]
    pairs = [(e, c) for e in exports for c in e.cells if c.label is not None]
    names = bundle.class_names
    unknown = sorted({c.label for _, c in pairs} - set(names))
    if unknown:
        raise CytoedgeError(f"{', '.join(map(str, paths))}: labels {unknown} are not classes of {bundle.name} "
                            f"({', '.join(names)})")
    labels = np.array([names.index(c.label) for _, c in pairs], np.int64)
    keep = stratified_subset(labels, per_class, seed)
    kept = {id(pairs[k][1]) for k in keep}
    exports = [dataclasses.replace(e, cells=tuple(c for c in e.cells if id(c) in kept)) for e in exports]
    return exports, labels[keep]


def review_cells(exports: list, bundle: ModelBundle, backend, options) -> SiteCells:
    """The cells readers confirmed or reclassified on review pages (exports from :func:`reviewed_labels`),
    cut again from their slides by ``score``'s own SlideScorer, so they reach the estimator as scored
    cells do. Each slide
    must be the one reviewed (its sha256, where the export has it); a cell is found by its centre
    (the nearest scored cell within 2 µm), else by its id. Only the labelled cells' tiles are kept, so
    memory follows the labels, not the slide. Cells not found again are skipped and listed."""
    from cytoedge.runtime.classify_cells import classify_batch
    from cytoedge.runtime.slide_scoring import SlideScorer
    from cytoedge.runtime.sources import open_source, source_sha256

    seen: list[CellBatch] = []

    def keep_batch(batch, *args):
        seen.append(batch)
        return classify_batch(batch, *args)

    scorer = SlideScorer(bundle, backend, "fast", options, classify=keep_batch)
    names = bundle.class_names
    batches, labels, files, skipped, sources = [], [], [], [], {}
    for export in exports:
        wanted = [c for c in export.cells if c.label is not None]  # classes checked by reviewed_labels
        if not wanted:
            continue
        slide = Path(export.source)
        if not slide.exists():
            raise CytoedgeError(f"{export.path}: the reviewed slide {slide} is not there (moved or deleted?)")
        if export.source_sha256 and source_sha256(slide) != export.source_sha256:
            raise CytoedgeError(f"{export.path}: {slide} is not the slide that was reviewed (its sha256 differs)")
        by_id = {c.id: c for c in wanted if c.centre is None}
        placed = [c for c in wanted if c.centre is not None]
        centres = np.array([c.centre for c in placed], np.float64).reshape(-1, 2)
        taken: set[int] = set()
        seen.clear()
        picked: list[int] = []  # rows of the current batch
        row = 0
        scale = options.um_per_px or export.um_per_px  # as the reader saw it scored, unless told otherwise
        for record in scorer.score_source(open_source(slide, scale)):
            if len(seen) > 1:  # a new batch began: keep the previous one's labelled rows only
                batches.append(compact(seen[0], picked))
                del seen[0]
                picked, row = [], 0
            cell = by_id.pop(record["id"], None)
            if cell is None and len(centres):
                d = np.hypot(*(centres - np.asarray(record["centre"])).T)
                k = int(d.argmin())
                if d[k] <= 2.0 / scorer.state.scale.um_per_px and k not in taken:
                    taken.add(k)
                    cell = placed[k]
            if cell is not None:
                picked.append(row)
                labels.append(names.index(cell.label))
                files.append(slide)
            row += 1
        if seen:
            batches.append(compact(seen[0], picked))
        missed = [c for k, c in enumerate(placed) if k not in taken] + list(by_id.values())
        skipped.extend({"image": f"{slide}#{c.id}", "reason": "not found again on the slide"} for c in missed)
        source = scorer.state.scale.source
        sources[source] = sources.get(source, 0) + 1
    return SiteCells(merged([b for b in batches if len(b)]), np.array(labels, np.int64), files, skipped,
                     {"slides_by_scale_source": sources})


def compact(batch: CellBatch, rows: list[int]) -> CellBatch:
    """The ``rows`` of ``batch`` with only the tiles they use (renumbered)."""
    table = batch.cells[np.asarray(rows, np.int64)].copy() if rows else batch.cells[:0].copy()
    used = sorted({int(t) for t in table[:, 0]})
    remap = {t: i for i, t in enumerate(used)}
    table[:, 0] = [remap[int(t)] for t in table[:, 0]]
    return CellBatch([batch.tiles[t] for t in used], table)


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
