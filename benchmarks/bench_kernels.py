"""Batched preprocessing: the numpy CPU twin vs the per-cell OpenCV loop, and a projected GPU cost.

    python benchmarks/bench_kernels.py [--cells 256] [--tiles 4] [--tile-size 512] [--runs 15] [--emulated]

Cells are cut from generated tiles (blurred noise) at random centres, angles, flips and scales, at
the bundle's input size. Variants run interleaved (each round runs every variant once) so load
from other processes hits them alike; medians of wall time and of the calling thread's CPU time
are reported (CPU time is what 1-thread variants cost when the machine is shared). OpenCV and
numpy are held to one thread except in the stated 2-thread twin. The GPU figure is a projection
from bytes moved and the H100's memory bandwidth, not a measurement.
"""
from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np

from results_md import write_section

from cytoedge.kernels.cell_batch import ColourTransform, cell_table, prepare_batch_opencv_loop
from cytoedge.kernels.cpu_twin import CpuPreprocessor
from cytoedge.models import default_bundle_path
from cytoedge.runtime.bundle import ModelBundle

TARGET_SPEEDUP = 5.0
H100_SXM_HBM_BYTES_PER_S = 3.35e12  # H100 SXM5 HBM3 peak (H100 PCIe: 2.0e12)
PCIE_BYTES_PER_S = 25e9  # assumed effective pinned host<->device copy rate, PCIe Gen4/5 x16
LAUNCH_FLOOR_S = 5e-6  # assumed per-launch floor for a small kernel
ACHIEVED_FRACTION = 0.6  # assumed fraction of peak bandwidth a gather-heavy kernel reaches


def generated_tiles(rng: np.random.Generator, count: int, size: int) -> list[np.ndarray]:
    tiles = []
    for _ in range(count):
        noise = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
        tiles.append(np.clip(cv2.GaussianBlur(noise, (0, 0), 3) * 4 - 384, 0, 255).astype(np.uint8))
    return tiles


def time_interleaved(variants: dict, runs: int) -> dict[str, tuple[float, float]]:
    """Median (wall s, thread CPU s) per variant; one warm-up round first."""
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for r in range(runs + 1):
        for name, fn in variants.items():
            w0, c0 = time.perf_counter(), time.thread_time()
            fn()
            w1, c1 = time.perf_counter(), time.thread_time()
            if r:
                wall[name].append(w1 - w0)
                cpu[name].append(c1 - c0)
    return {k: (float(np.median(wall[k])), float(np.median(cpu[k]))) for k in variants}


def projected_gpu_cost(n: int, size: int, out_itemsize: int) -> dict[str, float]:
    """Bytes one prepare launch moves in device memory, and the time they take at the H100's bandwidth."""
    taps = n * size * size * 4 * 3  # upper bound: every tap read from DRAM (in practice mostly L1/L2 hits)
    params = n * (6 * 4 + 4)
    outputs = n * size * size * (3 * out_itemsize + 1)
    device_bytes = taps + params + outputs
    bandwidth_s = device_bytes / (H100_SXM_HBM_BYTES_PER_S * ACHIEVED_FRACTION)
    return {"tap_bytes": taps, "out_bytes": outputs, "device_bytes": device_bytes, "bandwidth_s": bandwidth_s,
            "kernel_s": max(bandwidth_s, LAUNCH_FLOOR_S),
            "copy_back_s": outputs / PCIE_BYTES_PER_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=256)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--size", type=int, default=None, help="output size (default: the bundle's input size)")
    parser.add_argument("--emulated", action="store_true", help="also time the g++ build of the CUDA source")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    bundle = ModelBundle.load(default_bundle_path())
    size = args.size or bundle.input_size
    norm = bundle.manifest["input"]["normalisation"]
    colour = ColourTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    rng = np.random.default_rng(0)
    tiles = generated_tiles(rng, args.tiles, args.tile_size)
    n = args.cells
    cells = cell_table(rng.integers(0, args.tiles, n), rng.uniform(0, args.tile_size - 1, n),
                       rng.uniform(0, args.tile_size - 1, n), rng.uniform(0, 2 * np.pi, n), rng.random(n) < 0.5,
                       rng.uniform(0.8, 1.25, n))
    one, two = CpuPreprocessor(threads=1), CpuPreprocessor(threads=2)
    variants = {
        "OpenCV per-cell loop (1 thread)": lambda: prepare_batch_opencv_loop(tiles, cells, size, colour),
        "CPU twin, 1 thread": lambda: one.prepare_batch(tiles, cells, size, colour),
        "CPU twin, 2 threads": lambda: two.prepare_batch(tiles, cells, size, colour),
    }
    if args.emulated:
        from cytoedge.kernels.emulated import EmulatedKernels

        emulated = EmulatedKernels()
        variants["CUDA source built by g++ (emulation, 1 thread; a test tool)"] = \
            lambda: emulated.prepare_batch(tiles, cells, size, colour)
    timings = time_interleaved(variants, args.runs)
    two.close()
    base_wall, base_cpu = timings["OpenCV per-cell loop (1 thread)"]
    rows = ["| variant | median wall ms | median thread CPU ms | speed-up vs loop (wall / CPU) |", "|---|---|---|---|"]
    for name, (wall, cpu) in timings.items():
        cpu_cell = f"{cpu * 1e3:.2f}" if "2 threads" not in name else f"{cpu * 1e3:.2f} (calling thread only)"
        ratio_cpu = f"{base_cpu / cpu:.1f}×" if "2 threads" not in name else "–"
        rows.append(f"| {name} | {wall * 1e3:.2f} | {cpu_cell} | {base_wall / wall:.1f}× / {ratio_cpu} |")
    twin_wall, twin_cpu = timings["CPU twin, 1 thread"]
    best_wall = min(timings["CPU twin, 1 thread"][0], timings["CPU twin, 2 threads"][0])
    verdict = (f"Target (twin ≥ {TARGET_SPEEDUP:.0f}× the loop on {n} crops): 1-thread twin "
               f"{base_wall / twin_wall:.1f}× by wall time, {base_cpu / twin_cpu:.1f}× by CPU time; "
               f"best wall (1 or 2 threads) {base_wall / best_wall:.1f}× — "
               f"{'met' if base_wall / best_wall >= TARGET_SPEEDUP else 'NOT met'} by wall time.")
    f32, f16 = projected_gpu_cost(n, size, 4), projected_gpu_cost(n, size, 2)
    tile_bytes = sum(t.nbytes for t in tiles)
    load = os.getloadavg()
    body = "\n".join([
        f"{n} cells from {args.tiles} generated {args.tile_size}×{args.tile_size} RGB tiles, output {size}×{size} "
        f"(the bundle's input size), float32, random angle/flip/scale 0.8–1.25; {args.runs} interleaved rounds. "
        f"numpy {np.__version__}, OpenCV {cv2.__version__} (cv2.setNumThreads(1)); load average during the run "
        f"{load[0]:.1f} on {os.cpu_count()} CPUs; the thread-CPU column is the steadier comparison on a shared machine.",
        "",
        *rows,
        "",
        verdict,
        "Why the twin is faster: one `cv2.remap` per tile resamples every cell on it from stacked "
        "float32 maps (RGBA, where OpenCV's remap is about twice as fast as on RGB), validity is two "
        "`inRange` passes over the same maps, and colour + normalisation are a 256-entry table per "
        "channel (`cv2.LUT`) on the rounded grey levels; the loop pays two `warpAffine` calls and a "
        "dozen small numpy operations per cell. A second thread takes every other tile run and colour "
        "channel; the maps, the RGBA conversion and the reordering into NCHW stay on the calling thread. "
        "This machine's speed drifts between runs (the loop alone took 15–25 ms across runs of the same "
        "command), so compare ratios within one run.",
        "",
        "**Projected GPU cost (a projection from bytes moved, not a measurement; no GPU here):** one "
        f"`prepare_cells` launch for {n} cells reads at most {f32['tap_bytes'] / 1e6:.2f} MB of tile taps "
        f"(4 taps × 3 bytes per output pixel, an upper bound: neighbouring pixels share cache lines) and writes "
        f"{f32['out_bytes'] / 1e6:.2f} MB (FP32 + mask) / {f16['out_bytes'] / 1e6:.2f} MB (FP16 + mask): "
        f"{f32['device_bytes'] / 1e6:.2f} MB ÷ ({ACHIEVED_FRACTION:.0%} of 3.35 TB/s H100 SXM HBM3) ≈ "
        f"{f32['bandwidth_s'] * 1e6:.1f} µs FP32 ({f16['device_bytes'] / 1e6:.2f} MB, {f16['bandwidth_s'] * 1e6:.1f} µs FP16), "
        f"so a batch costs about {f32['kernel_s'] * 1e6:.0f} µs, the assumed ~{LAUNCH_FLOOR_S * 1e6:.0f} µs launch floor "
        f"at this batch size. Tiles go to the device once per field: {tile_bytes / 1e6:.1f} MB ≈ "
        f"{tile_bytes / PCIE_BYTES_PER_S * 1e3:.2f} ms at an assumed {PCIE_BYTES_PER_S / 1e9:.0f} GB/s PCIe. "
        f"Copying the FP32 batch back to the host (only when a consumer is not on the GPU) ≈ "
        f"{f32['copy_back_s'] * 1e6:.0f} µs at that rate. Noising adds 12 bytes per element "
        f"({n * 3 * size * size * 12 / 1e6:.1f} MB, ≈ {n * 3 * size * size * 12 / (H100_SXM_HBM_BYTES_PER_S * ACHIEVED_FRACTION) * 1e6:.1f} µs) "
        "and the masked error reads 8 bytes per element of each (cell, class) prediction, returning one float each.",
    ])
    print(body)
    if not args.no_write:
        write_section("bench-kernels", "Preprocessing kernels", body)


if __name__ == "__main__":
    main()
