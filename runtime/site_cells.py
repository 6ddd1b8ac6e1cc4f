"""A lab's labelled cells as the estimator will meet them: ``DIR/<class>/<image>`` read the way
``classify`` reads crops, or the way ``score`` reads fields (one white cell each), or the cells a
reader labelled on review pages, cut again from their slides as ``score`` cuts them, into CellBatches.

Adapting to a site only helps if the adapted numbers are fitted on exactly the pixels the commands
will later feed the model, so this module reuses their readers rather than a copy of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
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
        """The cells at ``index`` (in batch order) as CellBatches."""
        starts = np.cumsum([0] + [len(b) for b in self.batches])
        out = []
        for b, batch in enumerate(self.batches):
            rows = [int(i - starts[b]) for i in np.sort(index) if starts[b] <= i < starts[b + 1]]
            if rows:
                out.append(batch.subset(np.asarray(rows)))
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
    from cytoedge.runtime.slide_scoring import SlideScorer
    from cytoedge.runtime.sources import open_source

    seen: list[CellBatch] = []

    def keep_batch(batch, *args):
        seen.append(batch)
        return cut_only(batch, *args)

    scorer = SlideScorer(bundle, backend, "fast", replace(options, review_cells=0), classify=keep_batch)
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
        source = scorer.scale.source
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


# What a review export may say of how its slide was scored, so that its cells are cut again the same way.
REVIEW_SCORING_KEYS = ("stain_normalise", "stain_method", "stain_context", "stain_field_um", "tile_px", "overlap_um")


def review_cells(exports: list, bundle: ModelBundle, backend, options) -> SiteCells:
    """The cells readers confirmed or reclassified on review pages (exports from :func:`reviewed_labels`),
    cut again from their slides by ``score``'s own SlideScorer with the slide's own scoring options (its
    export's), so they reach the estimator as scored cells do. Each slide must be the one reviewed (its
    sha256, where the export has it); a cell is found by its centre (the nearest scored cell of its field
    within 2 µm not already taken), else by its id. Each labelled cell keeps only a window of its tile
    around it, so memory follows the labels, not the slides. Cells not found again are skipped and listed."""
    from cytoedge.runtime.slide_scoring import SlideScorer
    from cytoedge.runtime.sources import open_source, source_sha256

    seen: list[CellBatch] = []

    def keep_batch(batch, *args):
        seen.append(batch)
        return cut_only(batch, *args)

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
        as_scored = {k: v for k, v in (export.scoring_options or {}).items() if k in REVIEW_SCORING_KEYS}
        scorer = SlideScorer(bundle, backend, "fast", replace(options, **as_scored, review_cells=0), classify=keep_batch)
        by_id = {c.id: c for c in wanted if c.centre is None}
        placed = [c for c in wanted if c.centre is not None]
        centres = np.array([c.centre for c in placed], np.float64).reshape(-1, 2)
        fields = np.array([c.field or "" for c in placed], dtype=object)
        taken = np.zeros(len(placed), bool)
        seen.clear()
        picked: list[int] = []  # rows of the current batch
        row = 0
        scale = options.um_per_px or export.um_per_px  # as the reader saw it scored, unless told otherwise
        for record in scorer.score_source(open_source(slide, scale)):
            if len(seen) > 1:  # a new batch began: keep the previous one's labelled rows only
                batches.append(windows(seen[0], picked, 2 * bundle.input_size))
                del seen[0]
                picked, row = [], 0
            cell = by_id.pop(record["id"], None)
            if cell is None and len(centres):
                d = np.hypot(*(centres - np.asarray(record["centre"])).T)
                d[taken | (fields != (record.get("field") or ""))] = np.inf
                k = int(d.argmin())
                if d[k] <= 2.0 / scorer.scale.um_per_px:
                    taken[k] = True
                    cell = placed[k]
            if cell is not None:
                picked.append(row)
                labels.append(names.index(cell.label))
                files.append(slide)
            row += 1
        if seen:
            batches.append(windows(seen[0], picked, 2 * bundle.input_size))
        missed = [c for k, c in enumerate(placed) if not taken[k]] + list(by_id.values())
        skipped.extend({"image": f"{slide}#{c.id}", "reason": "not found again on the slide"} for c in missed)
        source = scorer.scale.source
        sources[source] = sources.get(source, 0) + 1
    return SiteCells(merged([b for b in batches if len(b)]), np.array(labels, np.int64), files, skipped,
                     {"slides_by_scale_source": sources})


def windows(batch: CellBatch, rows: list[int], side: int) -> CellBatch:
    """The ``rows`` of ``batch``, each with its own ``side``-px window of its tile around it (the cut and
    its rotations stay inside), so a kept cell holds kilobytes, not its whole tile."""
    tiles, table = [], []
    for r in rows:
        cell = batch.cells[r].copy()
        tile = batch.tiles[int(cell[0])]
        x0, y0 = int(np.floor(cell[1])) - side // 2, int(np.floor(cell[2])) - side // 2
        window = np.full((side, side, 3), 255, np.uint8)  # beyond the tile: glass, as the cut would see it
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + side, tile.shape[1]), min(y0 + side, tile.shape[0])
        if sx1 > sx0 and sy1 > sy0:
            window[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0:sy1, sx0:sx1]
        cell[0], cell[1], cell[2] = len(tiles), cell[1] - x0, cell[2] - y0
        tiles.append(window)
        table.append(cell)
    return CellBatch(tiles, np.array(table).reshape(-1, batch.cells.shape[1]))


def cut_only(batch: CellBatch, bundle: ModelBundle, *_) -> list[dict]:
    """The scorer's classifier where only its cut cells are wanted (they are measured afterwards under every
    class): a placeholder call per cell, so a slide is not classified once more for nothing."""
    return [{"class": bundle.class_names[0], "nfe": 0} for _ in range(len(batch))]


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
