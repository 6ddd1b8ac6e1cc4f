"""What `cytoedge compare` reads: the model's calls and a reader's labels, keyed so that the two of one
cell meet.

A slide's cell is keyed by its slide's ``source``, exactly as results.json writes it, and its ``id``:
that is what a review export and a CSV row name. A crop is keyed by its file resolved to an absolute
path from the current folder, because `cytoedge classify` writes the path as it was given: run compare
from where classify ran (or give absolute paths). Everything read is checked before anything is
compared, and a bad input fails with its file and what is wrong in it (CytoedgeError, exit 2). A label
naming a class the model does not have is refused unless the caller asks to ignore it: the confusion
matrix and κ are over the model's classes, and a reader's class the model cannot give (a smudge cell,
say) is a question for the pilot's protocol, not a row to slip in.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.json_files import read_json
from cytoedge.runtime.review_export import REVIEW_FORMAT, ReviewExport, load_review_export

RESULT_FORMATS = {"cytoedge-result": 1, "cytoedge-classify": 1}  # format → newest version read

Key = tuple  # ("cell", source, id) | ("image", absolute path)


def cell_key(source: str, cell_id: int) -> Key:
    return ("cell", source, int(cell_id))


def image_key(path: str | Path) -> Key:
    return ("image", str(Path(path).expanduser().resolve()))


def describe(key: Key) -> str:
    return f"cell {key[2]} of {key[1]}" if key[0] == "cell" else f"image {key[1]}"


@dataclass(frozen=True)
class ModelCall:
    """One cell as the model called it, and where its pixels are (for the disagreement gallery)."""

    key: Key
    predicted: str
    probability: float | None  # calibrated probability of ``predicted``; None with the reference estimator
    slide: str | None  # the slide's source; None for a crop
    image: str | None = None  # the crop file (classify)
    field: str | None = None  # the file the cell is in (score)
    bbox: tuple[float, float, float, float] | None = None  # in the field's pixels (score)
    document: str = ""  # the results file it came from


@dataclass
class ResultsSet:
    """The calls of every RESULTS document (one model), and what each document was."""

    calls: dict[Key, ModelCall]
    class_names: list[str]
    differential_classes: list[str]  # the classes a slide's differential counts (summary.differential)
    documents: list[dict]  # path, format, model, bundle_sha256, created, slides, cells, failed_slides
    slide_documents: dict[str, dict]  # slide source → its document's record


@dataclass(frozen=True)
class Label:
    cls: str
    origin: str  # the file (and line) it came from, for messages


@dataclass
class LabelSet:
    labels: dict[Key, Label]
    sources: list[dict]  # one per LABELS path: path, kind, labels (and a review export's source and reviewer)
    exports: list[ReviewExport] = field(default_factory=list)
    unknown_ignored: dict[str, int] = field(default_factory=dict)  # class → labels dropped


def _names_of(record: dict) -> list[str] | None:
    for key in ("probabilities", "scores"):
        if isinstance(record.get(key), dict) and record[key]:
            return list(record[key])
    return None


def _check_record(record, where: str, path: Path, keys: tuple[str, ...]) -> dict:
    if not isinstance(record, dict) or any(k not in record for k in keys):
        raise CytoedgeError(f"{path}: {where} is not a cell record (needs {', '.join(keys)})")
    if not isinstance(record["class"], str):
        raise CytoedgeError(f"{path}: {where}.class must be a class name, not {record['class']!r}")
    return record


def _probability(record: dict) -> float | None:
    p = (record.get("probabilities") or {}).get(record["class"])
    return float(p) if isinstance(p, (int, float)) else None


def _slide_calls(doc: dict, path: Path, info: dict) -> tuple[list[ModelCall], list[str] | None, list[str]]:
    slides = doc.get("slides")
    if not isinstance(slides, list):
        raise CytoedgeError(f"{path}: 'slides' must be a list of slide entries")
    calls, names, in_diff = [], None, []
    for s, slide in enumerate(slides):
        if not isinstance(slide, dict) or not isinstance(slide.get("source"), str):
            raise CytoedgeError(f"{path}: slides[{s}] has no 'source'")
        if slide.get("status") != "ok":
            info["failed_slides"] += 1
            continue
        info["slides"] += 1
        summary = slide.get("summary") or {}
        names = names or (list(summary["by_class"]) if isinstance(summary.get("by_class"), dict) else None)
        counted = summary.get("differential_classes") or summary.get("differential") or {}  # older documents: keys
        in_diff += [c for c in counted if c not in in_diff]
        for c, cell in enumerate(slide.get("cells") or []):
            where = f"slides[{s}].cells[{c}]"
            _check_record(cell, where, path, ("id", "class"))
            if not isinstance(cell["id"], int) or isinstance(cell["id"], bool):
                raise CytoedgeError(f"{path}: {where}.id must be a whole number, not {cell['id']!r}")
            names = names or _names_of(cell)
            bbox = cell.get("bbox")
            calls.append(ModelCall(cell_key(slide["source"], cell["id"]), cell["class"], _probability(cell),
                                   slide["source"], field=cell.get("field") or slide["source"],
                                   bbox=tuple(bbox) if isinstance(bbox, list) and len(bbox) == 4 else None,
                                   document=str(path)))
    return calls, names, in_diff


def _crop_calls(doc: dict, path: Path) -> tuple[list[ModelCall], list[str] | None]:
    results = doc.get("results")
    if not isinstance(results, list):
        raise CytoedgeError(f"{path}: 'results' must be a list of cell records")
    calls, names = [], None
    for k, record in enumerate(results):
        _check_record(record, f"results[{k}]", path, ("image", "class"))
        names = names or _names_of(record)
        calls.append(ModelCall(image_key(record["image"]), record["class"], _probability(record), None,
                               image=record["image"], document=str(path)))
    return calls, names


def load_results(paths: list[Path]) -> ResultsSet:
    """The model's calls in ``cytoedge score`` and ``cytoedge classify --json`` documents, all of one
    model (documents of different bundles are refused: a comparison is of one model)."""
    calls: dict[Key, ModelCall] = {}
    documents, slide_documents, names, in_diff = [], {}, None, []
    for path in map(Path, paths):
        doc = read_json(path, "cytoedge score results.json or cytoedge classify --json document")
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt == REVIEW_FORMAT:
            raise CytoedgeError(f"{path}: is a review export (the reader's labels); give it with --labels")
        if fmt not in RESULT_FORMATS:
            raise CytoedgeError(f"{path}: format {fmt!r} is not a result document ({', '.join(RESULT_FORMATS)})")
        version = doc.get("format_version")
        if not isinstance(version, int) or not 1 <= version <= RESULT_FORMATS[fmt]:
            raise CytoedgeError(f"{path}: {fmt} format_version {version!r} is not one this cytoedge reads "
                                f"(1-{RESULT_FORMATS[fmt]})")
        info = {"path": str(path), "format": fmt, "model": doc.get("model"), "bundle_sha256": doc.get("bundle_sha256"),
                "created": (doc.get("run") or {}).get("created"), "slides": 0, "failed_slides": 0}
        if fmt == "cytoedge-result":
            found, doc_names, doc_diff = _slide_calls(doc, path, info)
            in_diff += [c for c in doc_diff if c not in in_diff]
            slide_documents.update({slide["source"]: info for slide in doc["slides"]})
        else:
            found, doc_names = _crop_calls(doc, path)
        info["cells"] = len(found)
        if documents and info["bundle_sha256"] != documents[0]["bundle_sha256"]:
            raise CytoedgeError(f"{path}: is of model bundle {info['bundle_sha256']}, {documents[0]['path']} of "
                                f"{documents[0]['bundle_sha256']}; compare one model's results at a time")
        if names and doc_names and doc_names != names:
            raise CytoedgeError(f"{path}: classes {doc_names} differ from {documents[0]['path']}'s {names}")
        names = names or doc_names
        for call in found:
            if call.key in calls:
                raise CytoedgeError(f"{path}: {describe(call.key)} is also in {calls[call.key].document}; "
                                    "give each slide or crop once")
            calls[call.key] = call
        documents.append(info)
    if names is None:
        raise CytoedgeError(f"{', '.join(map(str, paths))}: no scored cell in any result document")
    for call in calls.values():
        if call.predicted not in names:
            raise CytoedgeError(f"{call.document}: {describe(call.key)} is called {call.predicted!r}, not one of "
                                f"the model's classes {names}")
    return ResultsSet(calls, names, in_diff or list(names), documents, slide_documents)


def _add(labels: dict[Key, Label], key: Key, label: Label) -> None:
    if key in labels:
        raise CytoedgeError(f"{label.origin}: {describe(key)} is labelled already in {labels[key].origin}")
    labels[key] = label


def _csv_labels(path: Path, labels: dict[Key, Label]) -> dict:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise CytoedgeError(f"{path}: cannot be read ({e})") from None
    except csv.Error as e:
        raise CytoedgeError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise CytoedgeError(f"{path}: empty CSV (expected a header with label and source,id or image)")
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    if "label" not in col:
        raise CytoedgeError(f"{path}: no 'label' column (header: {', '.join(header)})")
    by_cell, by_image = {"source", "id"} <= col.keys(), "image" in col
    if by_cell == by_image:
        raise CytoedgeError(f"{path}: needs either 'source' and 'id' columns (slide cells) or an 'image' column "
                            f"(crops), not {'both' if by_cell else 'neither'} (header: {', '.join(header)})")
    count, unlabelled = 0, 0
    for line, row in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in row):
            continue
        cell = {h: (row[i].strip() if i < len(row) else "") for h, i in col.items()}
        if not cell["label"]:
            unlabelled += 1
            continue
        origin = f"{path}:{line}"
        if by_cell:
            try:
                cid = int(cell["id"])
            except ValueError:
                raise CytoedgeError(f"{origin}: id {cell['id']!r} is not a whole number") from None
            if not cell["source"]:
                raise CytoedgeError(f"{origin}: empty source")
            key = cell_key(cell["source"], cid)
        else:
            if not cell["image"]:
                raise CytoedgeError(f"{origin}: empty image")
            key = image_key(cell["image"])
        _add(labels, key, Label(cell["label"], origin))
        count += 1
    return {"path": str(path), "kind": "csv", "labels": count, "unlabelled_rows": unlabelled}


def _folder_labels(path: Path, labels: dict[Key, Label]) -> dict:
    from cytoedge.runtime.labelled_data import list_labelled_files

    files, ids, names = list_labelled_files(path)
    if not files:
        raise CytoedgeError(f"{path}: no images in class folders (expected {path}/<class>/<image>)")
    for f, k in zip(files, ids):
        _add(labels, image_key(f), Label(names[k], str(f.parent)))
    return {"path": str(path), "kind": "folder", "labels": len(files)}


def _export_labels(export: ReviewExport, labels: dict[Key, Label]) -> dict:
    for cid, cls in export.labels().items():
        _add(labels, cell_key(export.source, cid), Label(cls, str(export.path)))
    return {"path": str(export.path), "kind": "review-export", "labels": len(export.labels()),
            "source": export.source, "reviewer": export.reviewer, "exported": export.exported}


def load_labels(paths: list[Path], class_names: list[str], ignore_unknown: bool = False) -> LabelSet:
    """The reader's labels in review exports (.json), CSVs (.csv) and labelled folders, by cell key.

    A label of a class not in ``class_names`` is an error naming it and its file, unless
    ``ignore_unknown`` (then it is dropped and counted)."""
    labels: dict[Key, Label] = {}
    sources, exports = [], []
    for path in map(Path, paths):
        if path.is_dir():
            sources.append(_folder_labels(path, labels))
        elif not path.exists():
            raise CytoedgeError(f"{path}: no such file or folder")
        elif path.suffix.lower() == ".csv":
            sources.append(_csv_labels(path, labels))
        elif path.suffix.lower() == ".json":
            exports.append(load_review_export(path))
            sources.append(_export_labels(exports[-1], labels))
        else:
            raise CytoedgeError(f"{path}: labels are a review export (.json), a CSV (.csv) or a folder "
                                "DIR/<class>/<image>")
    unknown = Counter(label.cls for label in labels.values() if label.cls not in class_names)
    if unknown and not ignore_unknown:
        first = next(label for label in labels.values() if label.cls in unknown)
        raise CytoedgeError(f"{first.origin}: label {first.cls!r} is not a class of the model {class_names} "
                            f"({sum(unknown.values())} such labels: {dict(unknown)}); correct them, or give "
                            "--ignore-unknown-labels to leave those cells out")
    kept = {k: v for k, v in labels.items() if v.cls in class_names}
    return LabelSet(kept, sources, exports, dict(unknown))


@dataclass(frozen=True)
class Matched:
    calls: list[ModelCall]  # the labelled calls, in results order
    labels: list[str]  # the reader's label of each
    results_unlabelled: int
    labels_unmatched: list[Key]


def match(results: ResultsSet, labels: LabelSet) -> Matched:
    """The cells both sides have; a side's other cells are counted (and left out)."""
    calls = [c for k, c in results.calls.items() if k in labels.labels]
    return Matched(calls, [labels.labels[c.key].cls for c in calls], len(results.calls) - len(calls),
                   [k for k in labels.labels if k not in results.calls])


def export_warnings(results: ResultsSet, labels: LabelSet) -> list[str]:
    """What a review export says that does not fit the results it is compared with: another bundle,
    another run, another model call for a cell, or a slide no RESULTS document holds."""
    out = []
    for export in labels.exports:
        doc = results.slide_documents.get(export.source)
        if doc is None:
            out.append(f"{export.path}: slide {export.source!r} is in no RESULTS document (their slides: "
                       f"{sorted(results.slide_documents)[:5]})")
            continue
        if export.bundle_sha256 != doc["bundle_sha256"]:
            out.append(f"{export.path}: reviewed with model bundle {export.bundle_sha256}, but {doc['path']} is "
                       f"of {doc['bundle_sha256']}")
        if export.results_created and doc["created"] and export.results_created != doc["created"]:
            out.append(f"{export.path}: reviews results created {export.results_created}, but {doc['path']} was "
                       f"created {doc['created']}")
        differ = [c.id for c in export.cells if (call := results.calls.get(cell_key(export.source, c.id)))
                  is not None and call.predicted != c.predicted]
        if differ:
            out.append(f"{export.path}: {len(differ)} cell(s) were predicted otherwise in {doc['path']} "
                       f"(ids {differ[:10]}); the export is of another run")
    return out
