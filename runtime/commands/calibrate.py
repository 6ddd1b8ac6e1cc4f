"""``cytoedge calibrate --data DIR``: fit the fast estimator's calibration on labelled cells.

This is also how a lab recalibrates after a new scanner or stain: a folder ``DIR/<class>/<image>``
of its own labelled cells (every class of the bundle present), then this command. The fitted
numbers and their provenance are written into the bundle (``calibration.json``, manifest re-hashed),
and then, with the new calibration, the out-of-domain alarm's reference (``domain.json``,
calibration/domain.py). ``--domain-only`` refits just that reference and leaves the calibration
(and an INT8 graph's decision check, which is stamped with it) as it is.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from cytoedge.runtime.commands.common import (CROP_SCALE_HELP, add_labelled_data_arguments, add_model_arguments,
                                              add_um_per_px_argument, load_bundle_and_backend, progress_bar)
from cytoedge.runtime.crop_scale import crop_scales_or_raise
from cytoedge.runtime.site_cells import crop_batches

log = logging.getLogger(__name__)



def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit calibration on labelled cells", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_labelled_data_arguments(p, every_class=True)
    add_model_arguments(p)
    p.add_argument("--half", choices=("fit", "held-out", "all"), default="fit",
                   help="which fixed half of DIR to fit on (default: fit; evaluate reports on held-out); "
                        "reviews are used whole")
    p.add_argument("--per-class", type=int, default=None, help="at most this many cells per class")
    add_um_per_px_argument(p, CROP_SCALE_HELP)
    p.add_argument("--errors-cache", type=Path, default=None,
                   help="npz to reuse (if present) or store the measured probe errors")
    p.add_argument("--domain-only", action="store_true",
                   help="refit only the out-of-domain alarm's reference (domain.json) with the current calibration")
    p.set_defaults(func=run)


def measure_errors(bundle, backend, batches, cells: int, probes, noise) -> np.ndarray:
    """``E [N, K(+1), P]`` of ``cells`` cells arriving as CellBatches, with a progress bar (calibrate, adapt)."""
    from cytoedge.runtime.probe_errors import all_class_errors

    parts = []
    with progress_bar(cells, "cells") as bar:
        for batch in batches:
            parts.append(all_class_errors(batch, bundle, backend, probes, noise))
            bar.update(len(batch))
    return np.concatenate(parts)


@dataclass
class LabelledCells:
    """What calibrate fits on, whatever it was read from: labels, the cells' batches by index (read
    lazily for a folder; kept for reviews, which are few), and how they were read (provenance)."""

    labels: np.ndarray
    batches: Callable[[np.ndarray], Iterable]
    provenance: dict
    description: str


def labelled_cells(args, bundle, backend) -> LabelledCells:
    """``--data``'s half of a labelled folder, or the cells of ``--reviews``; every class must be there
    (checked on the labels, before any cell is read)."""
    from cytoedge.calibration.fit import check_fit_labels
    from cytoedge.runtime.labelled_data import SPLIT_RULE, labelled_subset

    if args.reviews:
        from cytoedge.runtime.site_cells import review_cells, reviewed_labels
        from cytoedge.runtime.slide_scoring import ScoringOptions

        exports, labels = reviewed_labels(args.reviews, bundle, args.per_class)
        check_fit_labels(labels, bundle.class_names, bundle.abnormal_classes)
        cells = review_cells(exports, bundle, backend, ScoringOptions(um_per_px=args.um_per_px, heatmaps=False))
        check_fit_labels(cells.labels, bundle.class_names, bundle.abnormal_classes)
        where = ", ".join(map(str, args.reviews))
        return LabelledCells(cells.labels, cells.batches_of,
                             {"data": f"reviews {where}", "input": "reviews", "per_class": args.per_class,
                              "scale": cells.scale, "not_found_again": len(cells.skipped)}, f"review exports {where}")
    files, labels = labelled_subset(args.data, bundle.class_names, args.half, args.per_class)
    check_fit_labels(labels, bundle.class_names, bundle.abnormal_classes)  # before any cell is read
    scales = crop_scales_or_raise(files, bundle, args.um_per_px)
    return LabelledCells(labels, lambda index: crop_batches(bundle, [files[i] for i in index], scales),
                         {"data": str(args.data), "half": args.half, "split_rule": SPLIT_RULE,
                          "per_class": args.per_class, "crop_scale": scales.summary()},
                         f"{args.data} ({args.half} half)")


def fit_domain_reference(args, bundle, backend, cells: "LabelledCells") -> dict:
    """Fit the alarm's reference on part B of the calibration split: the anomaly normalisation was
    fitted on part A, whose scores are therefore lower than any new cell's (on PBC that alone raised
    the alarm on a third of held-out 50-cell runs)."""
    from cytoedge.calibration.domain import fit_domain_on_cells, write_domain
    from cytoedge.calibration.fit import split_ab
    from cytoedge.runtime.bundle import ModelBundle

    settings = bundle.calibration.settings
    _, part_b = split_ab(cells.labels, settings.get("split_a_fraction", 0.6), settings.get("seed", 0))
    provenance = {**cells.provenance, "part": "B of the calibration's A/B split (calibration/fit.py split_ab)",
                  "cells": int(len(part_b)), "backend": backend.name,
                  "calibration_sha256": bundle.file_sha256(bundle.manifest["calibration"]),
                  "command": "cytoedge calibrate" + (" --domain-only" if args.domain_only else "")}
    with progress_bar(len(part_b), "cells (domain)") as bar:
        def batches():
            for batch in cells.batches(part_b):
                yield batch
                bar.update(len(batch))
        domain = fit_domain_on_cells(bundle, backend, batches(), provenance)
    write_domain(ModelBundle.load(bundle.path), domain)
    return domain


def run(args: argparse.Namespace) -> int:
    from cytoedge.calibration.artefact import DEFAULT_CANDIDATES, candidate_probes, write_calibration
    from cytoedge.calibration.fit import fit_calibration
    from cytoedge.runtime.estimator import noise_bank
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.errors import CalibrationError

    bundle, backend, _ = load_bundle_and_backend(args)
    cells = labelled_cells(args, bundle, backend)
    labels = cells.labels
    if args.domain_only:
        if bundle.calibration is None:
            raise CalibrationError(f"{bundle.path}: --domain-only needs a calibrated bundle; run without it first")
        domain = fit_domain_reference(args, bundle, backend, cells)
        print(f"fitted the out-of-domain reference of {bundle.name} on {domain['provenance']['cells']} cells: typicality range "
              f"{[round(v, 3) for v in domain['typicality']['range']]} -> {bundle.path / 'domain.json'}")
        return 0
    probes = candidate_probes(DEFAULT_CANDIDATES["timesteps"], DEFAULT_CANDIDATES["replicas"])
    noise = noise_bank(bundle, len(probes), DEFAULT_CANDIDATES["noise_seed"])
    if args.errors_cache and args.errors_cache.exists():
        with np.load(args.errors_cache) as z:
            E = z["errors"]
        if E.shape != (len(labels), bundle.num_class_ids, len(probes)):
            raise SystemExit(f"{args.errors_cache}: cached errors have shape {E.shape}, not those of this data")
    else:
        E = measure_errors(bundle, backend, cells.batches(np.arange(len(labels))), len(labels), probes, noise)
        if args.errors_cache:
            np.savez(args.errors_cache, errors=E, labels=labels)
    fitted = fit_calibration(E, labels, bundle.class_names, bundle.abnormal_classes)
    provenance = {**cells.provenance, "cells": int(len(labels)), "backend": backend.name,
                  "candidates": DEFAULT_CANDIDATES, "command": "cytoedge calibrate"}
    path = write_calibration(bundle, fitted, probes, DEFAULT_CANDIDATES["noise_seed"], provenance)
    fit_domain_reference(args, ModelBundle.load(bundle.path), backend, cells)
    if bundle.cell_type == "red" and bundle.grading is None:  # a red-cell bundle grades what it reads
        from cytoedge.calibration.icsh_grading import write_grading

        write_grading(ModelBundle.load(bundle.path))
    print(f"calibrated {bundle.name} on {len(labels)} cells of {cells.description}: "
          f"{len(fitted['probe_weights'])} probes, temperature {fitted['temperature']:.4g} -> {path}")
    return 0
