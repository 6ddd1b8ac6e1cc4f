"""``cytoedge bench``: the denoiser latency benchmark a vendor runs on its own workstation.

Per backend and batch size: latency p50/p99 (ms) and throughput (denoiser evaluations/s); then the
estimator's cells/s on ``--cells`` cells (labelled crops from ``--data``, else seeded random tiles:
timing only). Writes a table to stdout and everything to ``--out`` (JSON) with the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency/throughput of each backend and the estimator's cells/s",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="bundle folder (default: the bundled model)")
    p.add_argument("--backends", default="auto", help="comma-separated backend names, or 'auto'")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per (backend, batch)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for CPU backends")
    p.add_argument("--streams", type=int, default=None,
                   help="ONNX Runtime CPU: sessions the batch is split across (default: one per core, up to 8)")
    p.add_argument("--cells", type=int, default=16, help="cells for the estimator's cells/s (0: skip)")
    p.add_argument("--data", type=Path, default=None, help="labelled cells DIR/<class>/* for the estimator run")
    p.add_argument("--estimator", choices=("fast", "reference"), default="fast",
                   help="estimator for the cells/s run (fast: the calibrated default of classify and score)")
    p.add_argument("--trials", type=int, default=40, help="reference-estimator trials per cell")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.set_defaults(func=run)


def time_denoiser(backend, bundle, batch: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    """Latency percentiles (ms) and throughput of ``backend.predict_noise`` at one batch size."""
    from cytoedge.export.validate import random_denoiser_inputs

    x, t, c = random_denoiser_inputs(batch, *bundle.denoiser_shape, len(bundle.class_names),
                                     bundle.schedule.num_train_timesteps, seed)
    for _ in range(warmup):
        backend.predict_noise(x, t, c)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.predict_noise(x, t, c)
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {"backend": backend.name, "streams": getattr(backend, "streams", 1), "batch": batch, "repeats": repeats,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "samples_per_s": float(batch / np.median(times))}


def estimator_cells_per_second(backend, bundle, batch, classify) -> dict:
    start = time.perf_counter()
    classify(batch, bundle, backend)
    seconds = time.perf_counter() - start
    return {"backend": backend.name, "cells": len(batch), "seconds": seconds, "cells_per_s": len(batch) / seconds}


def random_cells(bundle, n: int, seed: int = 0):
    """Seeded random RGB tiles as single-cell crops: for timing, not accuracy."""
    from cytoedge.runtime.cells import crops_to_batch, default_crop_um_per_px

    rng = np.random.default_rng(seed)
    side = int(round(bundle.input_size * bundle.um_per_px / default_crop_um_per_px(bundle))) + 8
    return crops_to_batch([rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)], bundle)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'backend':20} {'streams':>7} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'samples/s':>11}"]
    lines += [f"{r['backend']:20} {r['streams']:7d} {r['batch']:5d} {r['p50_ms']:9.2f} {r['p99_ms']:9.2f} "
              f"{r['samples_per_s']:11.1f}" for r in rows]
    return "\n".join(lines)


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version()}


def run(args: argparse.Namespace) -> int:
    from cytoedge.export.validate import classifier_by_name, load_labelled_cells
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle

    bundle = ModelBundle.load(args.model or default_bundle_path())
    batches = [int(b) for b in args.batches.split(",")]
    rows, estimator_rows = [], []
    cells = None
    if args.cells:
        cells = (load_labelled_cells(args.data, bundle, None)[0].subset(np.arange(args.cells)) if args.data
                 else random_cells(bundle, args.cells))
    classify = classifier_by_name(args.estimator, args.trials)
    for name in args.backends.split(","):
        backend = create_backend(bundle, name.strip(), threads=args.threads, streams=args.streams)
        for b in batches:
            rows.append(time_denoiser(backend, bundle, b, args.repeats, args.warmup))
        if cells is not None:
            estimator_rows.append(estimator_cells_per_second(backend, bundle, cells, classify))
        backend.close()
    print(format_table(rows))
    for r in estimator_rows:
        print(f"estimator ({args.estimator}) on {r['backend']}: {r['cells_per_s']:.2f} cells/s ({r['cells']} cells)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bundle": bundle.name, "bundle_sha256": bundle.sha256, "machine": machine(),
                                        "threads": args.threads, "streams": args.streams, "estimator": args.estimator,
                                        "trials": args.trials, "denoiser": rows,
                                        "estimator_runs": estimator_rows}, indent=2) + "\n")
    return 0
