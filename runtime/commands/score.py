"""``cytoedge score SLIDE... --out DIR``: score whole smears (fields, folders of fields, DICOM slides).

Writes DIR/results.json (the versioned result document, docs/results-format.md) and, per slide,
cells.csv, overlay.png, gallery.png, report.html and (DICOM input) annotations.dcm. A slide that
cannot be read, or has no white cells, gets an error entry; the others go on. The exit code is 1
whenever any input failed, a field of a folder included. Each slide is also appended to the run log
that ``cytoedge monitor`` reads (counts and rates, no patient identifier: docs/monitoring.md).

No patient identifier from a DICOM header is written anywhere but annotations.dcm (which links to
the patient's study for PACS) unless --include-identifiers asks for them in results.json;
--deidentify adds annotations.deid.dcm, the PS3.15 Basic Profile applied, for outputs that leave
the lab (docs/privacy.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from cytoedge.runtime.commands.common import (add_model_arguments, add_red_cell_arguments, add_run_log_arguments,
                                              add_scoring_arguments, load_bundle_and_backend, progress_bar,
                                              red_cell_stage, scoring_options)

log = logging.getLogger(__name__)


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """What ``score_paths`` prints (score and demo)."""
    p.add_argument("--json", action="store_true", help="also print the result document to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar or timing table")
    p.add_argument("--include-identifiers", action="store_true",
                   help="put the DICOM header's patient, study and specimen identifiers in results.json "
                        "(summary.identifiers); by default no output but annotations.dcm has any")
    p.add_argument("--deidentify", action="store_true",
                   help="also write annotations.deid.dcm: the DICOM annotations with the PS3.15 Basic "
                        "Application Level Confidentiality Profile applied, for outputs that leave the lab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score whole smears: fields, folders, DICOM slides", description=__doc__)
    p.add_argument("slides", nargs="+", type=Path, metavar="SLIDE", help="image, folder of fields, or DICOM file")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    add_model_arguments(p)
    add_scoring_arguments(p)
    add_red_cell_arguments(p)
    add_output_arguments(p)
    add_run_log_arguments(p, "one row per slide")
    p.set_defaults(func=run)


def score_paths(paths: list[Path], out: Path, args: argparse.Namespace, bundle=None, backend=None,
                estimator: str | None = None, run_log: Path | None = None) -> tuple[dict, list[str]]:
    """Score each path, write its reports, return (document, error messages).

    A slide that fails, for whatever reason, becomes an error entry and the others go on; each field of a
    folder that could not be read is an error too (the slide keeps the cells of its other fields, and its
    summary lists the failures). With ``run_log``, each slide is appended to that run log as it finishes."""
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.reports import write_slide_reports
    from cytoedge.runtime.reports.tables import write_json
    from cytoedge.runtime.red_cells import RedCellReader
    from cytoedge.runtime.run_log import record_slide
    from cytoedge.runtime.result_document import build_slides_document, slide_entry
    from cytoedge.runtime.slide_scoring import SlideScorer, options_dict
    from cytoedge.runtime.sources import DicomSlideSource, open_source, source_sha256

    if bundle is None:
        bundle, backend, estimator = load_bundle_and_backend(args)
    options = scoring_options(args)
    red = red_cell_stage(args)
    scorer = SlideScorer(bundle, backend, estimator, options, red_cells=RedCellReader(*red) if red else None)
    out.mkdir(parents=True, exist_ok=True)
    entries, errors, timings, counts, outputs = [], [], {}, {}, {}
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # the run's start: review pages carry it
    review_run = {"created": created, "options": review_scoring_options(options)}
    uids: dict[str, str] | None = {} if args.deidentify else None  # one UID map for the run's de-identified objects
    for index, path in enumerate(paths):
        t0 = time.perf_counter()
        source = scored = None
        try:
            source = open_source(path, options.um_per_px)
            try:
                with progress_bar(None, "cells", disable=args.quiet or args.json) as bar:
                    bar.set_description(path.name)
                    cells = []
                    for record in scorer.score_source(source):
                        cells.append(record)
                        bar.update(1)
                summary = scorer.summary()
                scored = scorer.scored()
                if args.include_identifiers and isinstance(source, DicomSlideSource):
                    summary["identifiers"] = source.identifiers()
            finally:
                source.close()
            if cells:
                entry = slide_entry(str(path), cells, summary)
            else:
                entry = slide_entry(str(path), [], summary, f"{path}: no white cells found (empty field, wrong "
                                                            "scale, or not a blood smear)")
        except (CytoedgeError, OSError) as e:
            entry = slide_entry(str(path), [], None, str(e) if str(path) in str(e) else f"{path}: {e}")
        except Exception as e:  # a bug met on one slide must not cost the others their results
            log.exception("%s: internal error while scoring", path)
            entry = slide_entry(str(path), [], None, f"{path}: internal error while scoring: {type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            entry["source_sha256"] = source_sha256(path)
        slide_errors = [f["error"] for f in getattr(source, "failures", [])]
        if "error" in entry:
            slide_errors.append(entry["error"])
        try:
            outputs[str(path)] = write_slide_reports(entry, scorer.audit, scored, out, index,
                                                     scored is not None and isinstance(source, DicomSlideSource),
                                                     uids, review_run)
        except Exception as e:  # results.json is still written, with this slide's entry
            log.exception("%s: reports not written", path)
            slide_errors.append(f"{path}: reports not written: {type(e).__name__}: {e}")
            outputs[str(path)] = {"error": slide_errors[-1]}
        for error in slide_errors:
            print(f"cytoedge score: {error}", file=sys.stderr)
        errors.extend(slide_errors)
        entries.append(entry)
        stage = dict(scored.timings) if scored is not None else {}
        if scored is not None:
            counts[str(path)] = scored.counts
        stage["total"] = time.perf_counter() - t0
        timings[str(path)] = {k: round(v, 4) for k, v in stage.items()}
        record_slide(run_log, entry, scorer.audit, stage["total"], "score")
    run = {"options": options_dict(options), "timings_s": timings, "stage_counts": counts, "outputs": outputs,
           "created": created}
    document = build_slides_document(entries, scorer.audit, run)
    write_json(document, out / "results.json")
    if not args.quiet and not args.json:
        print_timings(timings, entries)
    return document, errors


def review_scoring_options(options) -> dict:
    """The scoring options a review page records, so calibrate/adapt cut its cells again the same way."""
    from cytoedge.runtime.site_cells import REVIEW_SCORING_KEYS

    return {k: getattr(options, k) for k in REVIEW_SCORING_KEYS}


def print_timings(timings: dict, entries: list[dict]) -> None:
    for entry in entries:
        t = timings[entry["source"]]
        n = len(entry.get("cells", []))
        tri = (entry.get("summary") or {}).get("triage", {}).get("level", "error")
        stages = "  ".join(f"{k} {v:.2f}s" for k, v in t.items())
        rate = f"{n / t['total']:.1f} cells/s" if t.get("total") else ""
        print(f"{entry['source']}: {n} cells, triage {tri}; {stages}  ({rate})", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.run_log import resolve_run_log

    document, errors = score_paths(list(args.slides), args.out, args,
                                   run_log=resolve_run_log(args.run_log, args.no_run_log))
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(f"results: {args.out / 'results.json'}")
    return 1 if errors else 0
