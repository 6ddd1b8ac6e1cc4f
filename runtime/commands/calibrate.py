"""``cytoedge calibrate --data DIR``: fit the fast estimator's calibration on labelled cells.

This is also how a lab recalibrates after a new scanner or stain: a folder ``DIR/<class>/<image>``
of its own labelled cells (every class of the bundle present), then this command. The fitted
numbers and their provenance are written into the bundle (``calibration.json``, manifest re-hashed).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import (add_model_arguments, add_um_per_px_argument, load_bundle_and_backend,
                                              progress_bar)

log = logging.getLogger(__name__)

CHUNK = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit calibration on labelled cells", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="labelled folder DIR/<class>/<image>")
    add_model_arguments(p)
    p.add_argument("--half", choices=("fit", "held-out", "all"), default="fit",
                   help="which fixed half of DIR to fit on (default: fit; evaluate reports on held-out)")
    p.add_argument("--per-class", type=int, default=None, help="at most this many cells per class")
    add_um_per_px_argument(p, "scale of the crops (default: the bundle's training-crop scale)")
    p.add_argument("--errors-cache", type=Path, default=None,
                   help="npz to reuse (if present) or store the measured probe errors")
    p.set_defaults(func=run)


def measure_errors(args, bundle, backend, files, labels, probes, noise) -> np.ndarray:
    from cytoedge.runtime.cells import crops_to_batch, read_crop
    from cytoedge.runtime.probe_errors import all_class_errors

    parts = []
    with progress_bar(len(files), "cells") as bar:
        for s in range(0, len(files), CHUNK):
            batch = crops_to_batch([read_crop(f) for f in files[s:s + CHUNK]], bundle, args.um_per_px,
                                   [str(f) for f in files[s:s + CHUNK]])
            parts.append(all_class_errors(batch, bundle, backend, probes, noise))
            bar.update(len(batch))
    return np.concatenate(parts)


def run(args: argparse.Namespace) -> int:
    from cytoedge.calibration.artefact import DEFAULT_CANDIDATES, candidate_probes, write_calibration
    from cytoedge.calibration.fit import fit_calibration
    from cytoedge.runtime.estimator import noise_bank
    from cytoedge.runtime.labelled_data import SPLIT_RULE, labelled_subset

    bundle, backend, _ = load_bundle_and_backend(args)
    files, labels = labelled_subset(args.data, bundle.class_names, args.half, args.per_class)
    probes = candidate_probes(DEFAULT_CANDIDATES["timesteps"], DEFAULT_CANDIDATES["replicas"])
    noise = noise_bank(bundle, len(probes), DEFAULT_CANDIDATES["noise_seed"])
    if args.errors_cache and args.errors_cache.exists():
        with np.load(args.errors_cache) as z:
            E = z["errors"]
        if E.shape != (len(files), bundle.num_class_ids, len(probes)):
            raise SystemExit(f"{args.errors_cache}: cached errors have shape {E.shape}, not those of this data")
    else:
        E = measure_errors(args, bundle, backend, files, labels, probes, noise)
        if args.errors_cache:
            np.savez(args.errors_cache, errors=E, labels=labels)
    fitted = fit_calibration(E, labels, bundle.class_names, bundle.abnormal_classes)
    provenance = {"data": str(args.data), "half": args.half, "split_rule": SPLIT_RULE, "cells": int(len(files)),
                  "per_class": args.per_class, "backend": backend.name, "candidates": DEFAULT_CANDIDATES,
                  "command": "cytoedge calibrate"}
    path = write_calibration(bundle, fitted, probes, DEFAULT_CANDIDATES["noise_seed"], provenance)
    print(f"calibrated {bundle.name} on {len(files)} cells of {args.data} ({args.half} half): "
          f"{len(fitted['probe_weights'])} probes, temperature {fitted['temperature']:.4g} -> {path}")
    return 0
