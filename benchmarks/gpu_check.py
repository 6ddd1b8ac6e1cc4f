"""GPU check (issue #16 item 4): the CUDA kernels on CuPy against the CPU twin, and the estimator through
PyTorch FP16 on the GPU with the on-device probe loop, against the CPU ONNX path; cells/s of both loops.

    benchmarks/gpu_check.sh [--cpu-dry-run] [--cells 256] [--budget-s 450]   (writes $OUT/gpu_check.json)

Steps, each time-boxed by what is left of ``--budget-s`` and recorded as it ends (a run cut short
still leaves its JSON): ``environment``; ``kernels`` (prepare f32/f16, add_noise, masked error on
random tiles and cells vs cpu_twin: valid mask exact, cut within one grey level on at most 0.1 % of
values, noising 1e-6, error relative 1e-5); ``cells`` (drawn by the bundled model, DDIM, labels
known); ``reference`` (the race on the CPU ONNX FP32 backend); ``device_loop`` and ``host_loop`` (the
race through the GPU backend, errors on the device or on the host; cells/s, device→host floats);
``agreement`` (decisions: device vs host loop ≥ 0.99, device loop vs CPU ONNX ≥ --agreement-bar).

Without a CUDA device (neither PyTorch nor CuPy sees one) nothing runs: the JSON says so, exit code 0;
with a device but only one of them, nothing runs either, exit code 3.
``--cpu-dry-run`` runs every step on the CPU: the emulated .cu kernels (g++) for CuPy and
``EmulatedDeviceBackend`` around ONNX Runtime CPU for the GPU backend (tests/test_gpu_check.py).
Exit code: 0 all checks run passed (or no CUDA device), 1 a check failed or a step raised, 3 PyTorch CUDA
or CuPy missing beside a device.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform, cell_table
from cytoedge.kernels.cpu_twin import add_noise, error_norm, masked_weighted_error, prepare_batch
from cytoedge.models import default_bundle_path
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.device_errors import DeviceErrorSource
from cytoedge.runtime.estimator import (DenoiserErrorSource, error_source_for, noise_bank, probes_from_calibration,
                                        run_race)

NOTHING_RUN = "no CUDA device: nothing run"
INCOMPLETE = "a CUDA device but not both PyTorch CUDA and CuPy: nothing run"
COLOUR = ColourTransform(gain=(1.1, 0.95, 1.05), bias=(0.0, 0.01, -0.02), mean=(0.6, 0.5, 0.45), std=(0.2, 0.25, 0.3))
LOOP_AGREEMENT_BAR = 0.99  # device vs host loop on one backend: the same arithmetic but the error reduction


class Report:
    """The JSON document, rewritten after every step."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.start, self.budget_s = path, time.monotonic(), budget_s
        self.doc: dict = {"status": "running", "steps": {}}
        self.failed = False

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def step(self, name: str, fn: Callable[[], dict], needs_s: float) -> dict | None:
        """Run ``fn`` if ``needs_s`` seconds are left; its dict (``passed`` False fails the check) is recorded."""
        if self.left() < needs_s:
            self.doc["steps"][name] = {"skipped": f"time budget: {self.left():.0f} s left, step needs ~{needs_s:.0f} s"}
            self.failed = True
            self.write()
            return None
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # a step's failure is a finding: record it and go on
            result = {"passed": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        result["wall_s"] = round(time.monotonic() - t0, 3)
        self.failed |= result.get("passed") is False
        self.doc["steps"][name] = result
        self.write()
        return result

    def write(self) -> None:
        self.doc["elapsed_s"] = round(time.monotonic() - self.start, 3)
        self.path.write_text(json.dumps(self.doc, indent=2, default=float) + "\n")


def environment(dry_run: bool) -> tuple[dict, str | None, str | None]:
    """Versions and devices; (env, status, reason) where nothing can run on the GPU, else (env, None, None)."""
    from cytoedge.kernels.cupy_runner import cupy_device_available

    env = {"python": sys.version.split()[0], "machine": platform.machine(), "numpy": np.__version__,
           "mode": "cpu-dry-run" if dry_run else "gpu"}
    nvcc = shutil.which("nvcc")
    env["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] \
        if nvcc else None
    try:
        import torch

        env["torch"], env["torch_cuda"] = torch.__version__, torch.cuda.is_available()
        if env["torch_cuda"]:
            env["gpu"] = torch.cuda.get_device_name()
    except ImportError as e:
        env["torch"], env["torch_cuda"] = f"missing: {e}", False
    env["cupy_ok"], env["cupy"] = cupy_device_available()
    reason = f"PyTorch CUDA: {env['torch_cuda']}; CuPy: {env['cupy']}"
    if dry_run or env["torch_cuda"] and env["cupy_ok"]:
        return env, None, None
    return env, NOTHING_RUN if not env["torch_cuda"] and not env["cupy_ok"] else INCOMPLETE, reason


def make_kernels(dry_run: bool):
    """(the device kernels, how they were built): CuPy (NVRTC, else nvcc) on a GPU, the g++ emulation dry."""
    if dry_run:
        from cytoedge.kernels.emulated import EmulatedDeviceKernels

        return EmulatedDeviceKernels(), "g++ emulation (cuda_emulation.h)"
    from cytoedge.kernels.cupy_runner import CupyKernels

    try:
        return CupyKernels(compiler="nvrtc"), "cupy RawModule, NVRTC"
    except Exception as nvrtc_error:  # CuPy's CompileException has no stable import path
        return CupyKernels(compiler="nvcc"), f"cupy RawModule, nvcc (NVRTC failed: {nvrtc_error})"


def check_kernels(kernels, n_cells: int, rng: np.random.Generator) -> dict:
    """The device kernels against cpu_twin on random tiles and cells (cut, noising, error)."""
    tiles = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(1, 1), (37, 53), (256, 200)]]
    idx = rng.integers(0, len(tiles), n_cells)
    h = np.array([t.shape[0] for t in tiles], float)[idx]
    w = np.array([t.shape[1] for t in tiles], float)[idx]
    cells = cell_table(idx, rng.uniform(-6, w + 5), rng.uniform(-6, h + 5), rng.uniform(0, 2 * np.pi, n_cells),
                       rng.random(n_cells) < 0.5, rng.uniform(0.4, 2.0, n_cells))
    grey_step = float(np.max(np.asarray(COLOUR.gain) / (255 * np.asarray(COLOUR.std)))) * 1.01
    out: dict = {"cells": n_cells, "prepare": []}
    passed = True
    for size, dtype in [(32, np.float32), (33, np.float16), (7, np.float32)]:
        x_dev, v_dev = kernels.prepare_batch_device(tiles, cells, size, COLOUR, dtype)
        x_gpu, v_gpu = kernels.to_host(x_dev).astype(np.float32), kernels.to_host(v_dev)
        x_cpu, v_cpu = prepare_batch(tiles, cells, size, COLOUR, dtype)
        diff = np.abs(x_gpu - x_cpu.astype(np.float32))
        tol = grey_step + (float(np.finfo(np.float16).eps) * 8 if dtype == np.float16 else 1e-6)
        row = {"size": size, "dtype": np.dtype(dtype).name, "valid_mismatches": int((v_gpu != v_cpu).sum()),
               "max_abs_diff": float(diff.max()), "fraction_differing": float((diff > 1e-6).mean())}
        row["passed"] = row["valid_mismatches"] == 0 and row["max_abs_diff"] <= tol and row["fraction_differing"] <= 1e-3
        passed &= row["passed"]
        out["prepare"].append(row)
    x0 = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    noise = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    abar = rng.uniform(0, 1, 40).astype(np.float32)
    dev = kernels.to_device
    got = kernels.to_host(kernels.add_noise_device(dev(x0), dev(noise), dev(abar)))
    out["add_noise_max_abs_diff"] = float(np.abs(got - add_noise(x0, noise, abar)).max())
    mask = (rng.random((32, 32)) < 0.6).astype(np.float32)
    weights = rng.uniform(0.5, 2, 40).astype(np.float32)
    flat, inv_norm = error_norm(mask, x0.shape)
    got = kernels.to_host(kernels.masked_weighted_error_device(dev(x0), dev(noise), dev(flat), dev(weights), inv_norm))
    want = masked_weighted_error(x0, noise, mask, weights)
    out["error_max_rel_diff"] = float(np.max(np.abs(got / want - 1)))
    out["passed"] = bool(passed and out["add_noise_max_abs_diff"] <= 1e-6 and out["error_max_rel_diff"] <= 1e-5)
    return out


def draw_cells(bundle: ModelBundle, backend, per_class: int, steps: int) -> tuple[CellBatch, np.ndarray]:
    """Cells drawn by the bundle's model (labels known), each on a reflect-padded tile (as tests/conftest.py)."""
    from cytoedge.runtime.sampler import ddim_sample

    labels = np.repeat(np.arange(len(bundle.class_names)), per_class)
    images = ddim_sample(bundle, backend, labels, steps=steps, seed=11)
    pad = images.shape[1] // 4
    tiles = [cv2.copyMakeBorder(im, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) for im in images]
    centre = (tiles[0].shape[0] - 1) / 2.0
    cells = cell_table(np.arange(len(tiles)), np.full(len(tiles), centre), np.full(len(tiles), centre))
    return CellBatch(tiles, cells), labels


def race(batch: CellBatch, bundle: ModelBundle, source_of: Callable) -> tuple[np.ndarray, np.ndarray, float]:
    """(decided class per cell, NFE per cell, seconds) of the calibrated race with the given error source."""
    probes, settings = probes_from_calibration(bundle)
    t0 = time.perf_counter()
    source = source_of(batch, bundle, probes, noise_bank(bundle))
    result = run_race(len(batch), len(bundle.class_names), settings, source, bundle.null_class_id)
    return result.gaps.argmin(1), result.nfe, time.perf_counter() - t0


def timed_loop(batch: CellBatch, bundle: ModelBundle, labels: np.ndarray, source_of: Callable, kernels=None) -> dict:
    """The race once on a few cells (warm-up: compilation, cuDNN plans), then timed on all."""
    race(batch.subset(np.arange(min(8, len(batch)))), bundle, source_of)
    downloads = []
    if kernels is not None:  # count every device→host copy of the timed run
        to_host = kernels.to_host
        kernels.to_host = lambda a: (downloads.append(int(a.size)), to_host(a))[1]
    try:
        decided, nfe, seconds = race(batch, bundle, source_of)
    finally:
        if kernels is not None:
            del kernels.to_host
    out = {"cells": len(batch), "seconds": round(seconds, 4), "cells_per_s": round(len(batch) / seconds, 2),
           "nfe_mean": float(nfe.mean()), "accuracy_vs_drawn_labels": float((decided == labels).mean()),
           "decided": decided.tolist()}
    if kernels is not None:
        out["device_to_host_copies"] = len(downloads)
        out["device_to_host_floats"] = int(sum(downloads))
        out["passed"] = out["device_to_host_floats"] == int(nfe.sum())  # one float per (cell, class) per probe
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    p.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU (emulated kernels and device)")
    p.add_argument("--cells", type=int, default=None, help="cells drawn, rounded to whole classes "
                                                           "(default 512 on a GPU, 8 dry)")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for all steps (gpu_check.sh kills at 470)")
    p.add_argument("--agreement-bar", type=float, default=0.9,
                   help="least share of cells the GPU FP16 device loop decides as the CPU ONNX FP32 path")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / "gpu_check.json", args.budget_s)
    if dry:
        report.doc["note"] = "CPU dry run: the emulated kernels and device; no GPU ran, timings are the emulation's"
    env, status, reason = environment(dry)
    report.doc["environment"] = env
    if status:
        report.doc.update(status=status, reason=reason)
        report.write()
        print(f"gpu_check: {status} ({reason})")
        return 0 if status == NOTHING_RUN else 3
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    bundle = ModelBundle.load(default_bundle_path())
    report.doc["bundle"] = {"path": str(bundle.path), "sha256": bundle.sha256}
    state: dict = {}

    def kernels_step() -> dict:
        state["kernels"], how = make_kernels(dry)
        return {"built_by": how, **check_kernels(state["kernels"], 60 if dry else 2000, np.random.default_rng(1234))}

    report.step("kernels", kernels_step, needs_s=30)
    if "kernels" not in state:
        report.doc["status"] = "failed"
        report.write()
        return 1

    def backend_step() -> dict:
        out = {}
        try:
            state["cpu"] = OnnxRuntimeBackend(bundle)
        except Exception as e:  # no onnxruntime here: the reference step will say so
            out["cpu_backend_error"] = state["cpu_error"] = f"{type(e).__name__}: {e}"
        if dry:
            from cytoedge.runtime.backends.emulated_device import EmulatedDeviceBackend

            gpu = EmulatedDeviceBackend(bundle, state["cpu"], state["kernels"])
        else:
            from cytoedge.runtime.backends.torch_backend import TorchBackend

            gpu = TorchBackend(bundle, device="cuda", precision="fp16", device_kernels=state["kernels"])
        state["gpu"] = gpu
        per_class = max(1, -(-(args.cells or (8 if dry else 512)) // len(bundle.class_names)))
        state["batch"], state["labels"] = draw_cells(bundle, state["cpu"] if dry else gpu, per_class, 4 if dry else 12)
        chosen = error_source_for(state["batch"], bundle, gpu, probes_from_calibration(bundle)[0], noise_bank(bundle))
        return {**out, "gpu_backend": gpu.name, "cells": len(state["batch"]), "error_source": type(chosen).__name__,
                "passed": isinstance(chosen, DeviceErrorSource)}

    report.step("cells", backend_step, needs_s=60)
    if "batch" not in state:
        report.doc["status"] = "failed"
        report.write()
        return 1
    batch, labels, gpu = state["batch"], state["labels"], state["gpu"]

    def device_source(b, bun, probes, noise):
        return error_source_for(b, bun, gpu, probes, noise)

    def host_source(b, bun, probes, noise):
        return DenoiserErrorSource(b, bun, gpu, probes, noise)

    def cpu_source(b, bun, probes, noise):
        if "cpu" not in state:
            raise RuntimeError(f"no CPU ONNX backend: {state['cpu_error']}")
        return DenoiserErrorSource(b, bun, state["cpu"], probes, noise)

    results = {}
    for name, source_of, kernels, needs in [("device_loop", device_source, state["kernels"], 20),
                                            ("host_loop", host_source, None, 20),
                                            ("reference", cpu_source, None, 60)]:
        results[name] = report.step(name, lambda s=source_of, k=kernels: timed_loop(batch, bundle, labels, s, k), needs)

    def agreement() -> dict:
        dev, host, ref = (np.asarray(results[n]["decided"]) for n in ("device_loop", "host_loop", "reference"))
        out = {"device_vs_host_loop": float((dev == host).mean()), "device_loop_vs_cpu_onnx_fp32": float((dev == ref).mean()),
               "speedup_device_over_host_loop": results["device_loop"]["cells_per_s"] / results["host_loop"]["cells_per_s"],
               "bars": {"device_vs_host_loop": LOOP_AGREEMENT_BAR, "device_loop_vs_cpu_onnx_fp32": args.agreement_bar}}
        out["passed"] = out["device_vs_host_loop"] >= LOOP_AGREEMENT_BAR and \
            out["device_loop_vs_cpu_onnx_fp32"] >= args.agreement_bar
        return out

    if all(r is not None and "decided" in r for r in results.values()):
        report.step("agreement", agreement, needs_s=1)
    report.doc["status"] = "failed" if report.failed else "passed"
    report.write()
    print(f"gpu_check: {report.doc['status']} ({report.path})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
