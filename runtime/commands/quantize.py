"""``cytoedge quantize --data TRAIN_DIR --check CHECK_DIR``: an INT8 denoiser for CPUs with VNNI.

Measures how far quantising each convolution moves the calibrated class scores (on cells of
``--data``), keeps FP32 the fewest that hold the shift within ``--max-score-shift`` temperatures,
writes ``denoiser_int8.onnx`` into the bundle, and checks on ``--check`` cells (disjoint from
``--data``) that the fast estimator decides as with FP32 on at least the agreement bar. Only a graph
that passed is used (``--backend onnxruntime-cpu-int8``); the report is kept in the manifest.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import progress_bar


def add_parser(sub: argparse._SubParsersAction) -> None:
    from cytoedge.export.int8_selection import DEFAULTS

    p = sub.add_parser("quantize", help="INT8 denoiser for the CPU, checked against FP32 decisions",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="calibrated bundle to add the INT8 graph to")
    p.add_argument("--data", type=Path, required=True, help="labelled cells DIR/<class>/* for ranges and shifts")
    p.add_argument("--per-class", type=int, default=32, help="cells per class of --data")
    p.add_argument("--check", type=Path, required=True, help="labelled cells for the INT8 vs FP32 decision check")
    p.add_argument("--check-per-class", type=int, default=100, help="cells per class of --check (0: all)")
    p.add_argument("--max-score-shift", type=float, default=DEFAULTS["max_score_shift"],
                   help="budget: RMS shift of the running class scores after any probe, in calibrated temperatures")
    p.add_argument("--convs", default=None, help="comma-separated Conv node names that may become INT8 (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def clean_inputs(root: Path, bundle, per_class: int) -> np.ndarray:
    """Labelled crops as the denoiser's clean inputs (pixels, or latents for a latent bundle)."""
    from cytoedge.export.validate import load_labelled_cells
    from cytoedge.runtime.cells import model_inputs
    from cytoedge.runtime.encoders import create_encoder

    cells, _ = load_labelled_cells(root, bundle, per_class)
    x0 = model_inputs(cells.tiles, cells.cells, bundle)
    return create_encoder(bundle).encode(x0)


def check_labelled_folder(root: Path, bundle, option: str) -> None:
    """Refuse a labelled folder that does not exist, lacks a class folder, or holds no images (by name)."""
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.labelled_data import list_labelled_files

    files, _, _ = list_labelled_files(root, bundle.class_names)
    if not files:
        raise CytoedgeError(f"labelled data folder {root} ({option}) holds no images under {root}/<class>/")


def check_arguments(args: argparse.Namespace, bundle) -> tuple[list[str] | None, list[str]]:
    """Every input of the run, checked before any work (the activation-range pass alone takes a while):
    the options, the bundle's calibration and --convs names, and both labelled folders. Returns the
    --convs candidates (None: all) and the convolutions that will be tried."""
    import math

    from cytoedge.export.int8_selection import check_selection_inputs
    from cytoedge.runtime.errors import CytoedgeError

    if args.per_class < 1:
        raise CytoedgeError(f"--per-class must be at least 1, got {args.per_class}")
    if args.check_per_class < 0:
        raise CytoedgeError(f"--check-per-class must be 0 (all) or more, got {args.check_per_class}")
    if not (math.isfinite(args.max_score_shift) and args.max_score_shift > 0):
        raise CytoedgeError(f"--max-score-shift must be a positive number of temperatures, got {args.max_score_shift}")
    if args.threads is not None and args.threads < 1:
        raise CytoedgeError(f"--threads must be at least 1, got {args.threads}")
    candidates = None
    if args.convs is not None:
        candidates = [c.strip() for c in args.convs.split(",") if c.strip()]
        if not candidates:
            raise CytoedgeError(f"--convs {args.convs!r} names no convolution (comma-separated Conv node names)")
    tried = check_selection_inputs(bundle, candidates)
    check_labelled_folder(args.data, bundle, "--data")
    check_labelled_folder(args.check, bundle, "--check")
    return candidates, tried


def run(args: argparse.Namespace) -> int:
    import os

    from cytoedge.export.int8_selection import select_and_quantize
    from cytoedge.export.validate import DECISION_AGREEMENT_BAR, decision_agreement, fast_classifier, load_labelled_cells
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest

    bundle = ModelBundle.load(args.model or default_bundle_path())
    candidates, tried = check_arguments(args, bundle)
    dst = bundle.path / "denoiser_int8.onnx"
    # The graph is built beside the bundle's files under a temporary name and moved into place together with
    # the manifest that records its sha256, at the end: a failed or interrupted run leaves the bundle as it was.
    staged = bundle.path / f".{dst.stem}.{os.getpid()}.tmp{dst.suffix}"
    try:
        x0 = clean_inputs(args.data, bundle, args.per_class)
        order = np.random.default_rng(0).permutation(len(x0))
        with progress_bar(len(tried), "convs") as bar:
            report = select_and_quantize(bundle, x0, x0[order], staged, {"max_score_shift": args.max_score_shift},
                                         args.threads, candidates, progress=lambda conv: bar.update(1))
        cells, _ = load_labelled_cells(args.check, bundle, args.check_per_class or None)
        agreement = decision_agreement(cells, bundle, OnnxRuntimeBackend(bundle, threads=args.threads),
                                       OnnxRuntimeBackend(bundle, threads=args.threads, model_path=staged),
                                       fast_classifier())
        check = {"data": str(args.check), "per_class": args.check_per_class or "all", "estimator": "fast",
                 "calibration_sha256": bundle.file_sha256(bundle.manifest["calibration"]),
                 "cells": agreement.cells, "agreeing": agreement.agreeing, "agreement": agreement.rate,
                 "bar": DECISION_AGREEMENT_BAR, "passed": agreement.rate >= DECISION_AGREEMENT_BAR}
        manifest = json.loads((bundle.path / MANIFEST).read_text())
        den = manifest["networks"]["denoiser"]
        manifest["networks"]["denoiser_int8"] = {
            "file": dst.name, **{k: den[k] for k in ("inputs", "outputs") if k in den},
            "source_sha256": manifest["files"][den["file"]]["sha256"],  # checked against the file when loaded
            "quantization": {**report, "data": str(args.data), "per_class": args.per_class}, "decision_check": check}
        manifest["files"][dst.name] = {"sha256": ""}
        write_manifest(bundle.path, manifest, staged={dst.name: staged})
    finally:
        staged.unlink(missing_ok=True)  # gone after a successful write_manifest; a failed run's leftover otherwise
    verdict = "passed" if check["passed"] else "FAILED: the graph is written but will not be used"
    print(f"INT8 {dst}: {len(report['fp32_convs'])}/{report['convs']} convolutions FP32 "
          f"({report['fp32_mac_share']:.0%} of MACs), score shift ≤ {max(report['measured_score_shift']):.3f} T; "
          f"decisions {agreement.agreeing}/{agreement.cells} = {agreement.rate:.4f} vs bar {DECISION_AGREEMENT_BAR}: {verdict}")
    return 0 if check["passed"] else 1
