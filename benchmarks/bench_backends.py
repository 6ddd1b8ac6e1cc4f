"""Denoiser latency: ONNX Runtime CPU vs PyTorch eager, same network, same batch, same threads.

    python benchmarks/bench_backends.py [--batch 64] [--threads 1] [--repeats 15]
                                        [--int8-calibration ../shared/data/pbc/train --int8-check ../shared/data/pbc/calib]

Backends are timed round-robin (one call each, in turn), so load from other processes on a shared
machine hits all of them alike. With ``--int8-calibration`` an INT8 (VNNI) graph is also built and
timed, and with ``--int8-check`` its decisions are compared with FP32 on labelled cells: INT8 is only
usable where that agreement holds. Target (issue 6): ONNX Runtime CPU ≥ 2× PyTorch eager at batch 64.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.export.validate import (classifier_by_name, decision_agreement, load_labelled_cells,
                                      max_abs_error, random_denoiser_inputs)
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.backends.torch_backend import TorchBackend
from cytoedge.runtime.bundle import ModelBundle

TARGET_SPEEDUP = 2.0
AGREEMENT_BAR = 0.995  # a reduced-precision graph must decide like FP32 on at least this share of cells


def round_robin_times(backends: dict, feed: tuple, repeats: int, warmup: int = 2) -> dict[str, np.ndarray]:
    for _ in range(warmup):
        for b in backends.values():
            b.predict_noise(*feed)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, b in backends.items():
            start = time.perf_counter()
            b.predict_noise(*feed)
            times[name].append(time.perf_counter() - start)
    return {k: np.asarray(v) * 1e3 for k, v in times.items()}


def build_int8(bundle: ModelBundle, calibration: Path, out: Path) -> Path:
    from cytoedge.export.quantize import calibration_feeds, quantize_int8
    from cytoedge.kernels import prepare_batch

    cells, _ = load_labelled_cells(calibration, bundle, per_class=16)
    x0, _ = prepare_batch(cells.tiles, cells.cells, bundle.input_size)
    return quantize_int8(bundle.denoiser_path, out, calibration_feeds(bundle, x0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--int8-calibration", type=Path, default=None, help="labelled cells to calibrate INT8 on")
    p.add_argument("--int8-check", type=Path, default=None, help="labelled cells for INT8 vs FP32 decisions")
    p.add_argument("--check-per-class", type=int, default=25, help="cells per class for --int8-check (0: all)")
    p.add_argument("--estimator", choices=("fast", "reference"), default="fast")
    p.add_argument("--trials", type=int, default=40, help="reference-estimator trials per cell")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    bundle = ModelBundle.load(args.model or default_bundle_path())
    backends = {"torch eager (FP32)": TorchBackend(bundle, threads=args.threads),
                "onnxruntime-cpu (FP32)": OnnxRuntimeBackend(bundle, threads=args.threads)}
    tmp = tempfile.TemporaryDirectory()
    int8_note = "not built (pass --int8-calibration)"
    if args.int8_calibration:
        int8_path = build_int8(bundle, args.int8_calibration, Path(tmp.name) / "denoiser_int8.onnx")
        backends["onnxruntime-cpu (INT8 convs)"] = OnnxRuntimeBackend(bundle, threads=args.threads,
                                                                      model_path=int8_path)
    feed = random_denoiser_inputs(args.batch, *bundle.denoiser_shape, len(bundle.class_names),
                                  bundle.schedule.num_train_timesteps)
    ms = round_robin_times(backends, feed, args.repeats)
    base = np.median(ms["torch eager (FP32)"])
    rows = {name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                   "samples_per_s": float(args.batch / np.median(v) * 1e3), "speedup_vs_torch": float(base / np.median(v))}
            for name, v in ms.items()}
    result = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "backends": rows}
    int8_name = "onnxruntime-cpu (INT8 convs)"
    if int8_name in backends:
        fp32 = backends["onnxruntime-cpu (FP32)"]
        result["int8_max_abs_error_vs_fp32"] = max_abs_error(fp32, backends[int8_name], bundle)
        int8_note = f"max |ε̂ INT8 − ε̂ FP32| = {result['int8_max_abs_error_vs_fp32']:.3f}"
        if args.int8_check:
            cells, _ = load_labelled_cells(args.int8_check, bundle, args.check_per_class or None)
            agreement = decision_agreement(cells, bundle, fp32, backends[int8_name],
                                           classifier_by_name(args.estimator, args.trials))
            result["int8_decisions"] = {**agreement.to_dict(), "meets_bar": agreement.rate >= AGREEMENT_BAR}
            usable = "meets" if agreement.rate >= AGREEMENT_BAR else "does NOT meet"
            int8_note += (f"; {rows[int8_name]['speedup_vs_torch']:.2f}× PyTorch eager; {usable} the "
                          f"{AGREEMENT_BAR:.1%} decision bar: {agreement.agreeing}/{agreement.cells} = {agreement.rate:.4f} "
                          f"({args.estimator} estimator, {args.check_per_class or 'all'} cells/class of "
                          f"`{args.int8_check}`)")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ort_speedup = rows["onnxruntime-cpu (FP32)"]["speedup_vs_torch"]
    table = "\n".join(f"| {n} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['samples_per_s']:.0f} | "
                      f"{r['speedup_vs_torch']:.2f}× |" for n, r in rows.items())
    write_section("export-backends", "Export and backends: ONNX Runtime CPU vs PyTorch eager", f"""
Batch {args.batch}, {args.threads} thread(s) for every backend, {args.repeats} round-robin repeats, same network
(`{bundle.name}`, weights from its ONNX graph).

| backend | p50 ms | p99 ms | samples/s | speed-up vs torch |
|---|---|---|---|---|
{table}

Target ONNX Runtime CPU (FP32) ≥ {TARGET_SPEEDUP}× PyTorch eager: {'met' if ort_speedup >= TARGET_SPEEDUP else 'NOT met'} \
({ort_speedup:.2f}×). INT8: {int8_note}.
""")
    tmp.cleanup()


if __name__ == "__main__":
    main()
