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
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import (CROP_SCALE_HELP, add_model_arguments, add_um_per_px_argument,
                                              load_bundle_and_backend, progress_bar)
from cytoedge.runtime.crop_scale import crop_scales_or_raise
from cytoedge.runtime.site_cells import crop_batches

log = logging.getLogger(__name__)



def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit calibration on labelled cells", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="labelled folder DIR/<class>/<image>")
    add_model_arguments(p)
    p.add_argument("--half", choices=("fit", "held-out", "all"), default="fit",
                   help="which fixed half of DIR to fit on (default: fit; evaluate reports on held-out)")
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


def fit_domain_reference(args, bundle, backend, files, labels, scales) -> dict:
    """Fit the alarm's reference on part B of the calibration split: the anomaly normalisation was
    fitted on part A, whose scores are therefore lower than any new cell's (on PBC that alone raised
    the alarm on a third of held-out 50-cell runs)."""
    from cytoedge.calibration.domain import fit_domain_on_cells, write_domain
    from cytoedge.calibration.fit import split_ab
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.labelled_data import SPLIT_RULE

    settings = bundle.calibration.get("settings", {})
    _, part_b = split_ab(labels, settings.get("split_a_fraction", 0.6), settings.get("seed", 0))
    files = [files[i] for i in part_b]
    provenance = {"data": str(args.data), "half": args.half, "split_rule": SPLIT_RULE,
                  "part": "B of the calibration's A/B split (calibration/fit.py split_ab)", "cells": int(len(files)),
                  "per_class": args.per_class, "crop_scale": scales.summary(), "backend": backend.name,
                  "calibration_sha256": bundle.manifest["files"][bundle.manifest["calibration"]]["sha256"],
                  "command": "cytoedge calibrate" + (" --domain-only" if args.domain_only else "")}
    with progress_bar(len(files), "cells (domain)") as bar:
        def batches():
            for batch in crop_batches(bundle, files, scales):
                yield batch
                bar.update(len(batch))
        domain = fit_domain_on_cells(bundle, backend, batches(), provenance)
    write_domain(ModelBundle.load(bundle.path), domain)
    return domain


def run(args: argparse.Namespace) -> int:
    from cytoedge.calibration.artefact import DEFAULT_CANDIDATES, candidate_probes, write_calibration
    from cytoedge.calibration.fit import check_fit_labels, fit_calibration
    from cytoedge.runtime.estimator import noise_bank
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.errors import CalibrationError
    from cytoedge.runtime.labelled_data import SPLIT_RULE, labelled_subset

    bundle, backend, _ = load_bundle_and_backend(args)
    files, labels = labelled_subset(args.data, bundle.class_names, args.half, args.per_class)
    check_fit_labels(labels, bundle.class_names, bundle.abnormal_classes)  # before any cell is read
    scales = crop_scales_or_raise(files, bundle, args.um_per_px)
    if args.domain_only:
        if bundle.calibration is None:
            raise CalibrationError(f"{bundle.path}: --domain-only needs a calibrated bundle; run without it first")
        domain = fit_domain_reference(args, bundle, backend, files, labels, scales)
        print(f"fitted the out-of-domain reference of {bundle.name} on {domain['provenance']['cells']} cells: typicality range "
              f"{[round(v, 3) for v in domain['typicality']['range']]} -> {bundle.path / 'domain.json'}")
        return 0
    probes = candidate_probes(DEFAULT_CANDIDATES["timesteps"], DEFAULT_CANDIDATES["replicas"])
    noise = noise_bank(bundle, len(probes), DEFAULT_CANDIDATES["noise_seed"])
    if args.errors_cache and args.errors_cache.exists():
        with np.load(args.errors_cache) as z:
            E = z["errors"]
        if E.shape != (len(files), bundle.num_class_ids, len(probes)):
            raise SystemExit(f"{args.errors_cache}: cached errors have shape {E.shape}, not those of this data")
    else:
        E = measure_errors(bundle, backend, crop_batches(bundle, files, scales), len(files), probes, noise)
        if args.errors_cache:
            np.savez(args.errors_cache, errors=E, labels=labels)
    fitted = fit_calibration(E, labels, bundle.class_names, bundle.abnormal_classes)
    provenance = {"data": str(args.data), "half": args.half, "split_rule": SPLIT_RULE, "cells": int(len(files)),
                  "per_class": args.per_class, "crop_scale": scales.summary(), "backend": backend.name, "candidates": DEFAULT_CANDIDATES,
                  "command": "cytoedge calibrate"}
    path = write_calibration(bundle, fitted, probes, DEFAULT_CANDIDATES["noise_seed"], provenance)
    fit_domain_reference(args, ModelBundle.load(bundle.path), backend, files, labels, scales)
    print(f"calibrated {bundle.name} on {len(files)} cells of {args.data} ({args.half} half): "
          f"{len(fitted['probe_weights'])} probes, temperature {fitted['temperature']:.4g} -> {path}")
    return 0
