"""``cytoedge classify IMAGE|DIR...``: classify single-cell crops (the cell at the image centre).

An image far larger than a crop (a field or a slide) is refused alone and named; ``cytoedge score``
reads those."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cytoedge.runtime.commands.common import (CROP_SCALE_HELP, add_model_arguments, add_stain_argument,
                                              add_um_per_px_argument, crop_stain_normaliser, expand_image_paths,
                                              load_bundle_and_backend, progress_bar)

log = logging.getLogger(__name__)

CHUNK = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify single-cell images", description=__doc__)
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE|DIR", help="cell crops, or folders of them")
    add_model_arguments(p)
    add_um_per_px_argument(p, CROP_SCALE_HELP)
    add_stain_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.set_defaults(func=run)


# The --json document (docs/results-format.md, "classify"); renaming or removing a field raises the version.
CLASSIFY_FORMAT = "cytoedge-classify"
CLASSIFY_FORMAT_VERSION = 1


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.cells import crop_to_tile, read_crop, tiles_to_batch
    from cytoedge.runtime.classify_cells import classify_batch, mark_no_cell, mark_unreliable
    from cytoedge.runtime.crop_scale import estimate_crop_scales
    from cytoedge.runtime.domain_alarm import records_alarm
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.result_document import cell_record, run_audit

    bundle, backend, estimator = load_bundle_and_backend(args)
    normaliser = crop_stain_normaliser(args, bundle)
    paths, failures = expand_image_paths(args.inputs)
    scales, unreadable = estimate_crop_scales(paths, bundle, args.um_per_px, read_crop)
    failures += unreadable
    bad = {f["image"] for f in unreadable}
    paths = [p for p in paths if str(p) not in bad]
    results: list[dict] = []
    with progress_bar(len(paths), "cells", disable=len(paths) < 8 or args.json) as bar:
        for start in range(0, len(paths), CHUNK):
            chunk, tiles, crops = [], [], []
            for path in paths[start:start + CHUNK]:
                try:
                    rgb = read_crop(path)
                    if normaliser is not None:
                        rgb = normaliser.normalise(rgb)
                    tiles.append(crop_to_tile(rgb, bundle, scales.scale(str(path)).um_per_px, str(path)))
                    chunk.append(path)
                    crops.append(rgb)
                except CytoedgeError as e:
                    failures.append({"image": str(path), "error": str(e)})
                    bar.update(1)
            if not tiles:
                continue
            batch = tiles_to_batch(tiles, bundle.input_size)
            records = mark_no_cell(classify_batch(batch, bundle, backend, estimator), crops, bundle.cell_type)
            for path, record in zip(chunk, records):
                results.append({"image": str(path), **cell_record(record, bundle),
                                "scale": scales.scale(str(path)).to_record()})
            bar.update(len(chunk))
    verdict = records_alarm(results, bundle.domain)
    mark_unreliable(results, verdict)
    for failure in failures:
        print(f"cytoedge classify: {failure['error']}", file=sys.stderr)
    if verdict["raised"]:
        print(f"cytoedge classify: WARNING: {verdict['reason']} (see README, 'A new scanner or stain')",
              file=sys.stderr)
    if args.json:
        doc = {"format": CLASSIFY_FORMAT, "format_version": CLASSIFY_FORMAT_VERSION,
               **run_audit(bundle, backend, estimator), "stain_normalisation": f"{normaliser.method}-per-crop" if normaliser is not None else None,
               "scale": scales.summary(), "domain_alarm": verdict, "results": results, "errors": failures}
        print(json.dumps(doc, indent=2))
    else:
        for r in results:
            print(f"{r['image']}\t{r['class']}\t{r['estimator_detail']['confidence_label']}\tnfe={r['nfe']}")
    return 1 if failures else 0
