"""FP16 vs FP32 decision agreement of the exported denoiser on labelled cells (ONNX Runtime CPU).

    python benchmarks/bench_fp16.py --data ../shared/data/pbc/calib [--per-class N] [--estimator fast|reference]
                                    [--trials 40] [--threads 1] [--max-minutes 10]

Exports the bundle's FP16 graph (FP32 kept for normalisation, softmax, reductions, embeddings),
classifies the same cells with the same estimator and seeds on the FP32 and FP16 graphs, and
counts equal decisions. Cells are processed in class-balanced order and the run stops cleanly at
``--max-minutes``, so a partial run reports exactly how many cells it covered. Speed on the CPU
is not reported: FP16 is a GPU format and is slower here.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.export.export_bundle import export_bundle
from cytoedge.export.validate import DECISION_AGREEMENT_BAR, classifier_by_name, decision_agreement, load_labelled_cells
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle

TARGET = DECISION_AGREEMENT_BAR


def interleave_classes(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Order cells round-robin over classes (shuffled within each), so any prefix is class-balanced."""
    rng = np.random.default_rng(seed)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    order = []
    while any(per_class):
        for queue in per_class:
            if queue:
                order.append(queue.pop(0))
    return np.asarray(order)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=None, help="at most this many cells per class (default: all)")
    p.add_argument("--estimator", choices=("fast", "reference"), default="fast",
                   help="fast: the bundle's calibrated estimator; reference: CytoDiffusion's protocol (slow)")
    p.add_argument("--trials", type=int, default=40, help="reference-estimator trials per cell")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this long (partial result)")
    p.add_argument("--json", type=Path, default=None, help="write the result JSON here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report = export_bundle(args.model or default_bundle_path(), Path(tmp) / "bundle", fused=False)
        bundle = ModelBundle.load(Path(tmp) / "bundle")
        cells, labels = load_labelled_cells(args.data, bundle, args.per_class)
        order = interleave_classes(labels)
        fp32 = OnnxRuntimeBackend(bundle, threads=args.threads)
        fp16 = OnnxRuntimeBackend(bundle, threads=args.threads, model_path=bundle.network_path("denoiser_fp16"))
        classify = classifier_by_name(args.estimator, args.trials)
        start, done, agree, a_all, b_all = time.time(), 0, 0, [], []
        for s in range(0, len(order), args.chunk):
            if args.max_minutes and time.time() - start > args.max_minutes * 60:
                break
            idx = order[s:s + args.chunk]
            result = decision_agreement(cells.subset(idx), bundle, fp32, fp16, classify, chunk=args.chunk)
            done, agree = done + result.cells, agree + result.agreeing
            a_all.append(result.class_a)
            b_all.append(result.class_b)
            print(f"{done}/{len(order)} cells, agreement {agree / done:.4f}, chunk accuracy FP32 "
                  f"{(result.class_a == labels[idx]).mean():.3f}", flush=True)
        minutes = (time.time() - start) / 60
    y = labels[order[:done]]
    a, b = np.concatenate(a_all), np.concatenate(b_all)
    out = {"cells": done, "cells_available": int(len(order)), "agreeing": agree, "agreement": agree / done,
           "target": TARGET, "meets_target": agree / done >= TARGET, "accuracy_fp32": float((a == y).mean()),
           "accuracy_fp16": float((b == y).mean()), "estimator": args.estimator, "trials": args.trials,
           "threads": args.threads, "minutes": minutes, "export": report}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    partial = "" if done == len(order) else f" (partial: {done} of {len(order)} cells, stopped at the time limit)"
    est = f"{args.estimator}" + (f", {args.trials} trials, seed 0" if args.estimator == "reference" else "")
    write_section(f"export-fp16-{args.estimator}", f"Export and backends: FP16 vs FP32 decisions ({args.estimator} estimator)",
                  f"""
ONNX Runtime CPU, FP32 graph vs FP16 graph (FP32 islands: normalisation, softmax, reductions, embeddings),
estimator: {est}; data: `{args.data}`, class-balanced order{partial}.

| cells | agreeing | agreement | target | accuracy FP32 | accuracy FP16 | max abs ε error FP16 vs FP32 |
|---|---|---|---|---|---|---|
| {done} | {agree} | {agree / done:.4f} | ≥ {TARGET} | {out['accuracy_fp32']:.3f} | {out['accuracy_fp16']:.3f} | {report['denoiser_fp16_max_abs_error_vs_fp32']:.4f} |

FP16 is validated for accuracy on the CPU only; its CPU speed is not a GPU figure and is not reported.
""")


if __name__ == "__main__":
    main()
