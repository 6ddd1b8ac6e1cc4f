"""Per-sample cost of one denoiser evaluation on ONNX Runtime CPU at batch 1/16/64.

    python benchmarks/bench_denoiser.py [--model BUNDLE] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle


def time_batch(backend, bundle, batch: int, repeats: int, rng) -> list[float]:
    s = bundle.input_size
    x = rng.standard_normal((batch, 3, s, s)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    c = rng.integers(0, len(bundle.class_names), batch)
    for _ in range(3):
        backend.predict_noise(x, t, c)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.predict_noise(x, t, c)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, default=default_bundle_path())
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    bundle = ModelBundle.load(args.model)
    backend = OnnxRuntimeBackend(bundle, threads=args.threads)
    rng = np.random.default_rng(0)
    rows = ["| batch | per call p50 (ms) | per call p99 (ms) | per sample (ms) | samples/s |", "|---|---|---|---|---|"]
    for b in (1, 16, 64):
        ms = np.array(time_batch(backend, bundle, b, args.repeats, rng))
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        rows.append(f"| {b} | {p50:.2f} | {p99:.2f} | {p50 / b:.2f} | {1000 * b / p50:.0f} |")
        print(rows[-1])
    prov = bundle.manifest["provenance"]
    training = (f"Training of this model: {prov['steps']} steps of batch {prov['batch_size']} "
                f"({prov['train_minutes']} min wall clock on this 2-core CPU, shared with other work), "
                f"`{prov['trainer']}`; weights: {prov['weights']}.\n")
    body = (training + f"Model `{bundle.name}` ({bundle.input_size}×{bundle.input_size} px, bundle {bundle.sha256[:12]}), "
            f"ONNX Runtime CPU, {args.threads} threads as {backend.streams} stream(s), {args.repeats} timed calls after 3 "
            "warm-up calls.\n"
            "Target (issue 2): ≤ 5 ms per sample at batch 64.\n\n" + "\n".join(rows))
    write_section("denoiser-cost", "Denoiser cost on ONNX Runtime CPU", body)


if __name__ == "__main__":
    main()
