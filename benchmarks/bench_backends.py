"""Denoiser latency: ONNX Runtime CPU vs PyTorch eager, same network, same batch, same threads.

    python benchmarks/bench_backends.py [--batch 64] [--threads 1] [--repeats 15]

Backends are timed round-robin (one call each, in turn), so load from other processes on a shared
machine hits all of them alike. Where the bundle holds an INT8 graph (``cytoedge quantize``) it is
timed too, and its decision check against FP32 (recorded by ``cytoedge quantize``) is reported: INT8
is only usable where that check passed. Target (issue 6): ONNX Runtime CPU ≥ 2× PyTorch eager at batch 64.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.export.validate import max_abs_error, random_denoiser_inputs
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.backends.select import int8_availability
from cytoedge.runtime.backends.torch_backend import TorchBackend
from cytoedge.runtime.bundle import ModelBundle

TARGET_SPEEDUP = 2.0
INT8 = "onnxruntime-cpu (INT8 convs)"


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


def int8_summary(bundle: ModelBundle) -> str:
    """What ``cytoedge quantize`` recorded: FP32 convolutions kept, score shift, decision check."""
    net = bundle.manifest["networks"]["denoiser_int8"]
    q, c = net["quantization"], net["decision_check"]
    return (f"{len(q['fp32_convs'])} of {q['convs']} convolutions kept FP32 ({q['fp32_mac_share']:.0%} of MACs: "
            f"{', '.join(f'`{n}`' for n in q['fp32_convs'])}), class-score shift per probe {', '.join(f'{v:.3f}' for v in q['measured_score_shift'])} T "
            f"(budget {q['settings']['max_score_shift']}); fast-estimator decisions equal to FP32 on "
            f"{c['agreeing']}/{c['cells']} = {c['agreement']:.4f} cells of `{c['data']}` (bar {c['bar']}: "
            f"{'passed' if c['passed'] else 'FAILED'})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    bundle = ModelBundle.load(args.model or default_bundle_path())
    backends = {"torch eager (FP32)": TorchBackend(bundle, threads=args.threads),
                "onnxruntime-cpu (FP32)": OnnxRuntimeBackend(bundle, threads=args.threads)}
    has_int8 = bundle.network_path("denoiser_int8") is not None
    if has_int8:
        backends[INT8] = OnnxRuntimeBackend(bundle, threads=args.threads, precision="int8")
    feed = random_denoiser_inputs(args.batch, *bundle.denoiser_shape, len(bundle.class_names),
                                  bundle.schedule.num_train_timesteps)
    ms = round_robin_times(backends, feed, args.repeats)
    base = np.median(ms["torch eager (FP32)"])
    rows = {name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                   "samples_per_s": float(args.batch / np.median(v) * 1e3), "speedup_vs_torch": float(base / np.median(v))}
            for name, v in ms.items()}
    result = {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "backends": rows}
    fp32_speedup = rows["onnxruntime-cpu (FP32)"]["speedup_vs_torch"]
    verdict = f"FP32 {fp32_speedup:.2f}×: {'met' if fp32_speedup >= TARGET_SPEEDUP else 'NOT met'}"
    int8_note = "the bundle has no INT8 graph (`cytoedge quantize` adds one)"
    if has_int8:
        usable = int8_availability(bundle).available
        int8_speedup = rows[INT8]["speedup_vs_torch"]
        result["int8"] = {"usable": usable, "max_abs_error_vs_fp32": max_abs_error(backends["onnxruntime-cpu (FP32)"],
                                                                                   backends[INT8], bundle),
                          "decision_check": bundle.manifest["networks"]["denoiser_int8"]["decision_check"]}
        int8_note = f"{int8_summary(bundle)}; max |ε̂ INT8 − ε̂ FP32| = {result['int8']['max_abs_error_vs_fp32']:.3f}"
        met = usable and int8_speedup >= TARGET_SPEEDUP
        verdict += (f"; INT8 {int8_speedup:.2f}× and {'usable' if usable else 'NOT usable'}: "
                    f"{'met' if met else 'NOT met'}")
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(f"| {n} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['samples_per_s']:.0f} | "
                      f"{r['speedup_vs_torch']:.2f}× |" for n, r in rows.items())
    write_section("export-backends", "Export and backends: ONNX Runtime CPU vs PyTorch eager", f"""
Batch {args.batch}, {args.threads} thread(s) for every backend, {args.repeats} round-robin repeats, same network
(`{bundle.name}`, bundle {bundle.sha256[:12]}, weights from its ONNX graph).

| backend | p50 ms | p99 ms | samples/s | speed-up vs torch |
|---|---|---|---|---|
{table}

Target ONNX Runtime CPU ≥ {TARGET_SPEEDUP}× PyTorch eager (batch {args.batch}, same threads): {verdict}.
INT8 graph: {int8_note}.
""")


if __name__ == "__main__":
    main()
