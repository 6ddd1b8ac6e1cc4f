"""Review exports (``cytoedge-review``, docs/review-format.md): a reader's corrections of one slide.

The review page writes one per slide; `cytoedge compare` reads them as the reader's labels, and
calibrate/adapt may take them as labelled cells. They are written by a browser page and edited or
renamed by people, so each is checked whole before any cell is used: a wrong file fails with its name
and the field that is wrong, never halfway through a comparison. Keys this version does not know are
ignored (a newer page may add some); a newer ``format_version`` is refused.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.json_files import read_json

REVIEW_FORMAT = "cytoedge-review"
REVIEW_FORMAT_VERSION = 1
STATUSES = ("confirmed", "reclassified", "unreviewed")
LABELLED = ("confirmed", "reclassified")  # the statuses whose label is the reader's


class ReviewExportError(CytoedgeError):
    """A review export is unreadable, of another format, or has a missing or malformed field."""


@dataclass(frozen=True)
class ReviewedCell:
    id: int
    predicted: str
    label: str | None  # None: not reviewed
    status: str  # one of STATUSES
    centre: tuple[float, float] | None = None  # slide pixels, where calibrate/adapt cut the cell again
    field: str | None = None  # the field of a folder slide the cell lies in


@dataclass(frozen=True)
class ReviewExport:
    path: Path
    source: str  # the slide entry's source, exactly as in results.json
    source_sha256: str | None  # the slide file's sha256 (results.json's), to check it is the same slide
    um_per_px: float | None  # the slide's pixel size as scored, so its cells are cut again at the same scale
    scoring_options: dict | None  # how the slide was scored (stain, tiling), for the same reason
    bundle_sha256: str
    calibration_sha256: str | None
    model: str
    cytoedge_version: str
    results_created: str | None  # run.created of the results.json reviewed
    reviewer: str
    exported: str
    cells: tuple[ReviewedCell, ...]
    differential: dict[str, int]

    def labels(self) -> dict[int, str]:
        """The reader's label of each confirmed or reclassified cell, by cell id."""
        return {c.id: c.label for c in self.cells if c.status in LABELLED}


def _fail(name: str, field: str, what: str) -> ReviewExportError:
    return ReviewExportError(f"{name}: review export field {field!r} {what}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(doc: dict, key: str, name: str, optional: bool = False, empty: bool = True) -> str | None:
    """``doc[key]`` as a string (``optional``: absent or null give None; ``empty``: "" is allowed)."""
    value = doc.get(key)
    if value is None and optional:
        return None
    if key not in doc:
        raise _fail(name, key, "is missing")
    if not isinstance(value, str) or not (empty or value):
        kind = "a string" if empty else "a non-empty string"
        raise _fail(name, key, f"must be {kind}{' or null' if optional else ''}, not {value!r}")
    return value


def _options(doc: dict, name: str) -> dict | None:
    value = doc.get("scoring_options")
    if value is not None and not isinstance(value, dict):
        raise _fail(name, "scoring_options", f"must be an object or null, not {value!r}")
    return value


def _scale(doc: dict, name: str) -> float | None:
    value = doc.get("um_per_px")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(name, "um_per_px", f"must be a positive pixel size in µm or null, not {value!r}")
    return float(value)


def _cell(item, index: int, name: str) -> ReviewedCell:
    where = f"cells[{index}]"
    if not isinstance(item, dict):
        raise _fail(name, where, f"must be an object, not {type(item).__name__}")
    for key in ("id", "predicted", "label", "status"):
        if key not in item:
            raise _fail(name, f"{where}.{key}", "is missing")
    cid, predicted, label, status = item["id"], item["predicted"], item["label"], item["status"]
    if not _is_int(cid) or cid < 0:
        raise _fail(name, f"{where}.id", f"must be a cell id (a whole number >= 0), not {cid!r}")
    if not isinstance(predicted, str) or not predicted:
        raise _fail(name, f"{where}.predicted", f"must be a class name, not {predicted!r}")
    if status not in STATUSES:
        raise _fail(name, f"{where}.status", f"must be one of {list(STATUSES)}, not {status!r}")
    if status == "unreviewed":
        if label is not None:
            raise _fail(name, f"{where}.label", f"must be null for an unreviewed cell, not {label!r}")
    elif not isinstance(label, str) or not label:
        raise _fail(name, f"{where}.label", f"must be a class name for a {status} cell, not {label!r}")
    elif status == "confirmed" and label != predicted:
        raise _fail(name, f"{where}.label", f"is {label!r} but the cell is 'confirmed' as {predicted!r}; "
                                            "a changed class is 'reclassified'")
    centre, cell_field = item.get("centre"), item.get("field")
    if centre is not None and not (isinstance(centre, list) and len(centre) == 2
                                   and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in centre)):
        raise _fail(name, f"{where}.centre", f"must be [x, y] in slide pixels or null, not {centre!r}")
    if cell_field is not None and not isinstance(cell_field, str):
        raise _fail(name, f"{where}.field", f"must be a string or null, not {cell_field!r}")
    return ReviewedCell(cid, predicted, label, status, None if centre is None else (float(centre[0]), float(centre[1])),
                        cell_field)


def validate(doc, name: str | Path) -> ReviewExport:
    """The export ``doc`` (parsed JSON) as a ReviewExport; ReviewExportError naming ``name`` and the
    field otherwise. Also checks that ``differential`` counts the reviewed labels."""
    name = str(name)
    if not isinstance(doc, dict):
        raise ReviewExportError(f"{name}: a review export is a JSON object, not {type(doc).__name__}")
    if doc.get("format") != REVIEW_FORMAT:
        hint = " (a result document: the model's calls, not a reader's)" \
            if doc.get("format") in ("cytoedge-result", "cytoedge-classify") else ""
        raise _fail(name, "format", f"must be {REVIEW_FORMAT!r}, not {doc.get('format')!r}{hint}")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise _fail(name, "format_version", f"must be a whole number >= 1, not {version!r}")
    if version > REVIEW_FORMAT_VERSION:
        raise _fail(name, "format_version", f"is {version}, newer than this cytoedge reads "
                                            f"({REVIEW_FORMAT_VERSION}); update cytoedge")
    cells = doc.get("cells")
    if not isinstance(cells, list):
        raise _fail(name, "cells", "is missing" if "cells" not in doc else "must be a list of cell objects")
    parsed = tuple(_cell(item, k, name) for k, item in enumerate(cells))
    seen: dict[int, int] = {}
    for k, c in enumerate(parsed):
        if c.id in seen:
            raise _fail(name, f"cells[{k}].id", f"repeats cell {c.id} of cells[{seen[c.id]}]")
        seen[c.id] = k
    differential = doc.get("differential", {})
    if not isinstance(differential, dict) or not all(isinstance(k, str) and _is_int(v) and v >= 0
                                                     for k, v in differential.items()):
        raise _fail(name, "differential", "must be an object of class name -> count")
    counted = Counter(c.label for c in parsed if c.status in LABELLED)
    stated = {k: v for k, v in differential.items() if v}
    if "differential" in doc and stated != dict(counted):
        raise _fail(name, "differential", f"is {stated} but the reviewed cells count {dict(counted)}")
    return ReviewExport(
        path=Path(name), source=_text(doc, "source", name, empty=False),
        source_sha256=_text(doc, "source_sha256", name, optional=True), um_per_px=_scale(doc, name),
        scoring_options=_options(doc, name),
        bundle_sha256=_text(doc, "bundle_sha256", name, empty=False),
        calibration_sha256=_text(doc, "calibration_sha256", name, optional=True),
        model=_text(doc, "model", name), cytoedge_version=_text(doc, "cytoedge_version", name),
        results_created=_text(doc, "results_created", name, optional=True),
        reviewer=_text(doc, "reviewer", name), exported=_text(doc, "exported", name),
        cells=parsed, differential=dict(differential))


def load_review_export(path: str | Path) -> ReviewExport:
    """Read and validate one review export file (ReviewExportError names the file and what is wrong)."""
    path = Path(path)
    return validate(read_json(path, "cytoedge-review export", ReviewExportError), path)
