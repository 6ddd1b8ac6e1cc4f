"""Denoiser latency: ONNX Runtime CPU vs PyTorch eager, same network, same batch, same threads.

    python benchmarks/bench_backends.py [--batch 64] [--threads 1] [--repeats 15]

Backends are timed round-robin (one call each, in turn), so load from other processes on a shared
machine hits all of them alike. ONNX Runtime runs as cytoedge ships it: the batch split across
single-threaded sessions, one per core ("streams"). Two rows show what that split is worth on its
own: ONNX Runtime as one session using every thread, and PyTorch eager split the same way. Where the bundle holds an INT8 graph (``cytoedge quantize``) it is
timed too, and its decision check against FP32 (recorded by ``cytoedge quantize``) is reported: INT8
is only usable where that check passed. Target (issue 6): ONNX Runtime CPU ≥ 2× PyTorch eager at batch 64.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
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
TORCH = "torch eager (FP32)"
FP32 = "onnxruntime-cpu (FP32)"
INT8 = "onnxruntime-cpu (INT8 convs)"


class TorchStreams:
    """PyTorch eager with the batch split across single-threaded Python threads, as ONNX Runtime's
    streams split it: shows how much of ONNX Runtime's lead is the split rather than the runtime."""

    def __init__(self, bundle: ModelBundle, threads: int):
        from cytoedge.runtime.backends.onnxruntime_backend import shard_bounds

        self.backend, self.threads, self.shard_bounds = TorchBackend(bundle), threads, shard_bounds
        self.pool = ThreadPoolExecutor(threads)

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        import torch

        threads = torch.get_num_threads()  # process-wide: restore it for the plain torch row
        torch.set_num_threads(1)
        try:
            parts = [self.pool.submit(self.backend.predict_noise, x_t[lo:hi], timestep[lo:hi], class_id[lo:hi])
                     for lo, hi in self.shard_bounds(len(x_t), self.threads)]
            return np.concatenate([f.result() for f in parts])
        finally:
            torch.set_num_threads(threads)


def round_robin_times(backends: dict, feed: tuple, repeats: int, warmup: int = 2,
                      pause_s: float = 0.2) -> dict[str, np.ndarray]:
    """Milliseconds per call of each backend. ``pause_s`` between calls lets the previous backend's
    thread pool stop spinning (OpenMP and ONNX Runtime workers busy-wait after a call) so it does not
    steal a core from the next one."""
    for _ in range(warmup):
        for b in backends.values():
            b.predict_noise(*feed)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, b in backends.items():
            time.sleep(pause_s)
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
    backends = {TORCH: TorchBackend(bundle, threads=args.threads),
                FP32: OnnxRuntimeBackend(bundle, threads=args.threads)}
    streams = backends[FP32].streams
    if streams > 1:
        backends[f"{TORCH}, {streams} streams"] = TorchStreams(bundle, streams)
        backends[f"{FP32}, 1 session × {args.threads} threads"] = OnnxRuntimeBackend(bundle, threads=args.threads,
                                                                                      streams=1)
    has_int8 = bundle.network_path("denoiser_int8") is not None
    if has_int8:
        backends[INT8] = OnnxRuntimeBackend(bundle, threads=args.threads, precision="int8")
    feed = random_denoiser_inputs(args.batch, *bundle.denoiser_shape, len(bundle.class_names),
                                  bundle.schedule.num_train_timesteps)
    ms = round_robin_times(backends, feed, args.repeats)
    base = np.median(ms[TORCH])
    rows = {name: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99)),
                   "samples_per_s": float(args.batch / np.median(v) * 1e3), "speedup_vs_torch": float(base / np.median(v))}
            for name, v in ms.items()}
    result = {"batch": args.batch, "threads": args.threads, "streams": streams, "repeats": args.repeats,
              "backends": rows}
    fp32_speedup = rows[FP32]["speedup_vs_torch"]
    verdict = f"FP32 {fp32_speedup:.2f}×: {'met' if fp32_speedup >= TARGET_SPEEDUP else 'NOT met'}"
    int8_note = "the bundle has no INT8 graph (`cytoedge quantize` adds one)"
    if has_int8:
        usable = int8_availability(bundle).available
        int8_speedup = rows[INT8]["speedup_vs_torch"]
        result["int8"] = {"usable": usable, "max_abs_error_vs_fp32": max_abs_error(backends[FP32],
                                                                                   backends[INT8], bundle),
                          "decision_check": bundle.manifest["networks"]["denoiser_int8"]["decision_check"]}
        int8_note = f"{int8_summary(bundle)}; max |ε̂ INT8 − ε̂ FP32| = {result['int8']['max_abs_error_vs_fp32']:.3f}"
        met = usable and int8_speedup >= TARGET_SPEEDUP
        verdict += (f"; INT8 {int8_speedup:.2f}× and {'usable' if usable else 'NOT usable'}: "
                    f"{'met' if met else 'NOT met'}")
    torch_streams = f"{TORCH}, {streams} streams"
    if torch_streams in rows:
        fair = {k: float(np.median(ms[torch_streams]) / np.median(ms[k])) for k in (FP32, INT8) if k in ms}
        result["speedup_vs_torch_streams"] = fair
        verdict += "; against PyTorch split into the same streams: " + ", ".join(
            f"{'INT8' if k == INT8 else 'FP32'} {v:.2f}×" for k, v in fair.items())
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(f"| {n} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['samples_per_s']:.0f} | "
                      f"{r['speedup_vs_torch']:.2f}× |" for n, r in rows.items())
    write_section("export-backends", "Export and backends: ONNX Runtime CPU vs PyTorch eager", f"""
Batch {args.batch}, {args.threads} thread(s) for every backend, {args.repeats} round-robin repeats, same network
(`{bundle.name}`, bundle {bundle.sha256[:12]}, weights from its ONNX graph). ONNX Runtime rows without a note run
as shipped: {streams} stream(s) (the batch split across single-threaded sessions, one per core).

| backend | p50 ms | p99 ms | samples/s | speed-up vs torch |
|---|---|---|---|---|
{table}

Target ONNX Runtime CPU ≥ {TARGET_SPEEDUP}× PyTorch eager (batch {args.batch}, same threads): {verdict}.
INT8 graph: {int8_note}.
""")


if __name__ == "__main__":
    main()
