"""``cytoedge compare RESULTS... --labels LABELS...``: the silent-mode pilot, the model against a human reader.

RESULTS are `cytoedge score` results.json or `cytoedge classify --json` documents of one model. LABELS
are review exports (.json, from the review page), CSVs (.csv: a label column beside source,id for slide
cells or image for crops) or labelled folders DIR/<class>/<image>. Reports per-class sensitivity and
specificity (the reader is the reference), Cohen's kappa, the confusion matrix and, per slide, the
model's differential against the reader's with the reader's Rümke 95 % interval (CLSI H20-A2). --out
also writes compare.json and a disagreement gallery (disagreements.html, disagreements.png). Relative
image paths resolve from the current folder, as classify wrote them. Exit status: 0 all thresholds met
(or none set), 1 a threshold not met (each is listed), 2 bad input (the message names the file).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cytoedge.runtime.commands.common import add_run_log_arguments, bounded_int

COMPARE_FORMAT = "cytoedge-compare"
COMPARE_FORMAT_VERSION = 1
EXAMPLES = 3  # unmatched labels named on stderr


def _bounded_float(low: float, high: float | None):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low <= value and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text} is outside {low}-{high if high is not None else 'inf'}")
        return value

    return parse


def class_bound(text: str) -> tuple[str | None, float]:
    """argparse type of --min-sensitivity/--min-specificity: ``X`` (every class) or ``CLASS=X``, X in 0-1."""
    cls, sep, value = text.rpartition("=")
    return (cls.strip() or None) if sep else None, _bounded_float(0.0, 1.0)(value)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="silent-mode pilot: agreement of the model with a human reader",
                       description=__doc__)
    p.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                   help="results.json of cytoedge score, or the --json document of cytoedge classify")
    p.add_argument("--labels", nargs="+", action="extend", type=Path, required=True, metavar="LABELS",
                   help="review exports (.json), CSVs (.csv) or labelled folders DIR/<class>/<image>; after "
                        "RESULTS (or repeat --labels)")
    p.add_argument("--ignore-unknown-labels", action="store_true",
                   help="leave out cells the reader labelled with a class the model does not have (default: "
                        "refuse them)")
    p.add_argument("--out", type=Path, default=None,
                   help="write compare.json, disagreements.html and disagreements.png here")
    p.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    p.add_argument("--max-gallery", type=bounded_int(0, 10_000), default=200,
                   help="disagreeing cells shown in the gallery at most (default 200)")
    g = p.add_argument_group("thresholds (exit 1 when one is not met)")
    g.add_argument("--min-kappa", type=_bounded_float(-1.0, 1.0), default=None, metavar="K", help="Cohen's kappa")
    g.add_argument("--min-sensitivity", type=class_bound, action="append", default=[], metavar="[CLASS=]X",
                   help="of every class the reader labelled (X), or of one (CLASS=X, overrides); repeatable")
    g.add_argument("--min-specificity", type=class_bound, action="append", default=[], metavar="[CLASS=]X",
                   help="as --min-sensitivity")
    g.add_argument("--max-differential-diff", type=_bounded_float(0.0, None), default=None, metavar="PP",
                   help="largest model-reader difference of any class's share on any slide, percentage points")
    add_run_log_arguments(p, "a compare that meets the thresholds set, as a revalidation")
    p.set_defaults(func=run)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(report: dict) -> None:
    a, match = report["agreement"], report["matching"]
    print(f"matched {match['matched']} cells ({match['results_unlabelled']} of the model's cells unlabelled, "
          f"{match['labels_unmatched']} labels without a result)")
    width = max(len(n) for n in a["per_class"]) + 2
    print(f"{'class':<{width}}{'reader':>7}{'model':>7}{'both':>6}{'sensitivity':>13}{'specificity':>13}")
    for n, v in a["per_class"].items():
        print(f"{n:<{width}}{v['reader']:>7}{v['model']:>7}{v['agreed']:>6}{_fmt(v['sensitivity']):>13}"
              f"{_fmt(v['specificity']):>13}")
    k = a["kappa"]
    print(f"accuracy {_fmt(a['accuracy'])}  balanced accuracy {_fmt(a['balanced_accuracy'])}  "
          f"kappa {_fmt(k['value'])} (95 % CI {_fmt(k['ci95'][0])}-{_fmt(k['ci95'][1])})")
    names = a["confusion_matrix"]["rows_reader_cols_model"]
    print("confusion matrix (rows reader, columns model):")
    print(" " * width + "".join(f"{n[:6]:>7}" for n in names))
    for n, row in zip(names, a["confusion_matrix"]["counts"]):
        print(f"{n:<{width}}" + "".join(f"{v:>7}" for v in row))
    for slide in report["slides"]:
        print(f"\n{slide['source']}: differential over {slide['reader_cells']} reader / {slide['model_cells']} "
              "model cells; reader's Rümke 95 % interval (exact binomial)")
        print(f"{'class':<{width}}{'reader %':>9}{'Rümke 95 %':>15}{'model %':>9}{'diff pp':>9}  inside")
        for c, v in slide["classes"].items():
            lo, hi = v["reader_rumke95_percent"]
            inside = {True: "yes", False: "NO", None: "-"}[v["model_inside"]]
            print(f"{c:<{width}}{_fmt(v['reader_percent'], '.1f'):>9}{_fmt(lo, '.1f') + '-' + _fmt(hi, '.1f'):>15}"
                  f"{_fmt(v['model_percent'], '.1f'):>9}{_fmt(v['difference_pp'], '+.1f'):>9}  {inside}")
    if not report["slides"]:
        print("no per-slide differential: the results are single-cell crops")
    th = report["thresholds"]
    print("\nthresholds: " + ("none set" if not th["any_set"] else "all met" if th["passed"]
                              else f"{len(th['failures'])} not met"))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from cytoedge.calibration.agreement import Thresholds, agreement, slide_differentials, threshold_failures
    from cytoedge.runtime import __version__
    from cytoedge.runtime.compare_inputs import describe, export_warnings, load_labels, load_results, match
    from cytoedge.runtime.errors import CytoedgeError

    thresholds = Thresholds(args.min_kappa, tuple(args.min_sensitivity), tuple(args.min_specificity),
                            args.max_differential_diff)
    results = load_results(args.results)
    names = results.class_names
    thresholds.check_classes(names)
    labels = load_labels(args.labels, names, args.ignore_unknown_labels)
    warnings = export_warnings(results, labels)
    for warning in warnings:
        print(f"cytoedge compare: WARNING: {warning}", file=sys.stderr)
    matched = match(results, labels)
    if matched.labels_unmatched:
        shown = "; ".join(describe(k) for k in matched.labels_unmatched[:EXAMPLES])
        print(f"cytoedge compare: {len(matched.labels_unmatched)} label(s) match no cell of RESULTS (e.g. {shown}); "
              "sources must be as in results.json, image paths resolve from the current folder", file=sys.stderr)
    if not matched.calls:
        raise CytoedgeError(f"{', '.join(map(str, args.labels))}: no label matches a cell of "
                            f"{', '.join(map(str, args.results))} ({len(labels.labels)} labels, "
                            f"{len(results.calls)} cells)")
    reader = np.array([names.index(cls) for cls in matched.labels], np.int64)
    model = np.array([names.index(c.predicted) for c in matched.calls], np.int64)
    summary = agreement(reader, model, names)
    slides = slide_differentials([c.slide for c in matched.calls], reader, model, names,
                                 results.differential_classes)
    failures = threshold_failures(summary, slides, thresholds)
    settings = thresholds.to_dict()
    report = {
        "format": COMPARE_FORMAT, "format_version": COMPARE_FORMAT_VERSION, "cytoedge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": results.documents[0]["model"], "bundle_sha256": results.documents[0]["bundle_sha256"],
        "results": results.documents, "labels": labels.sources, "warnings": warnings,
        "matching": {"matched": len(matched.calls), "results_unlabelled": matched.results_unlabelled,
                     "labels_unmatched": len(matched.labels_unmatched),
                     "unknown_labels_ignored": labels.unknown_ignored},
        "agreement": summary, "slides": slides,
        "thresholds": {"settings": settings, "any_set": any(v not in (None, {}) for v in settings.values()),
                       "failures": failures, "passed": not failures},
    }
    disagreeing = sorted((i for i in range(len(reader)) if reader[i] != model[i]),
                         key=lambda i: (matched.labels[i], matched.calls[i].predicted,
                                        -(matched.calls[i].probability or 0.0)))
    report["gallery"] = {"disagreements": len(disagreeing)}  # what --out shows of them, write_outputs adds
    if args.out is not None:
        write_outputs(report, [(matched.calls[i], matched.labels[i]) for i in disagreeing[:args.max_gallery]],
                      args.out)
    if report["thresholds"]["any_set"] and not failures:  # a passed revalidation: the monitor's new baseline
        record_passed_revalidation(args, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    for failure in failures:
        print(f"cytoedge compare: threshold not met: {failure}", file=sys.stderr)
    return 1 if failures else 0


def record_passed_revalidation(args: argparse.Namespace, report: dict) -> None:
    """Log a compare that met the lab's thresholds: `cytoedge monitor` counts the days since, and takes a
    new baseline from it. A run log that cannot be written is a warning, not a failed compare."""
    from datetime import datetime, timezone

    from cytoedge.runtime.run_log import record_revalidation, resolve_run_log

    path = resolve_run_log(args.run_log, args.no_run_log)
    if path is None:
        return
    details = {"bundle_sha256": report["bundle_sha256"], "model": report["model"],
               "results": [d["path"] for d in report["results"]], "labels": [s["path"] for s in report["labels"]],
               "cells": report["agreement"]["cells"], "kappa": report["agreement"]["kappa"]["value"],
               "balanced_accuracy": report["agreement"]["balanced_accuracy"],
               "thresholds": report["thresholds"]["settings"]}
    try:
        record_revalidation(path, datetime.now(timezone.utc), details)
    except Exception as e:  # the comparison stands whatever the log's state
        print(f"cytoedge compare: run log {path} not written: {type(e).__name__}: {e}", file=sys.stderr)


def write_outputs(report: dict, shown: list, out: Path) -> None:
    """compare.json and the gallery (disagreements.html, .png) in ``out``; ``report['gallery']`` is
    completed with what was shown and written."""
    from cytoedge.runtime.reports.disagreements import GalleryCell, contact_sheet, load_images, render_html
    from cytoedge.runtime.reports.images import write_png
    from cytoedge.runtime.reports.tables import write_json

    from cytoedge.runtime.errors import CytoedgeError

    cells = [GalleryCell(call, label) for call, label in shown]
    load_images(cells)
    report["gallery"].update({"shown": len(cells), "missing_images": sum(c.rgb is None for c in cells),
                              "files": {"json": str(out / "compare.json"), "html": str(out / "disagreements.html"),
                                        "png": str(out / "disagreements.png")}})
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_png(contact_sheet(cells), out / "disagreements.png")
        (out / "disagreements.html").write_text(render_html(report, cells), encoding="utf-8")
        write_json(report, out / "compare.json")
    except OSError as e:
        raise CytoedgeError(f"{out}: cannot write the comparison there ({e.strerror or e})") from None
