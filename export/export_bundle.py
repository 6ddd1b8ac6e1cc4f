"""Re-export a bundle's PyTorch denoiser: ONNX (opset ≥ 17), optional fused error graph, FP16 copies.

Every graph written is checked against PyTorch (max |ONNX Runtime − PyTorch|) and the report is
stored in the new bundle's manifest (``provenance.export``). Decision-level checks (does the FP16
graph classify like FP32?) live in ``export.validate`` and ``benchmarks/bench_fp16.py``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from cytoedge.export.fp16 import convert_to_fp16
from cytoedge.export.onnx_export import OPSET, denoiser_error_module, export_fused_error_onnx, export_network
from cytoedge.runtime.backends import engine_spec
from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest
from cytoedge.runtime.errors import BundleError

log = logging.getLogger(__name__)


def _ort_run(path: Path, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _probe_inputs(bundle: ModelBundle, batch: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    s, k, t = bundle.input_size, len(bundle.class_names), bundle.schedule.num_train_timesteps
    x0 = rng.uniform(-1, 1, (batch, 3, s, s)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    timestep = rng.integers(0, t, batch).astype(np.int64)
    return {"x0": x0, "noise": noise, "timestep": timestep, "class_id": rng.integers(0, k, batch).astype(np.int64),
            "weight": rng.uniform(0.5, 2, batch).astype(np.float32),
            "x_t": bundle.schedule.add_noise(x0, noise, timestep).astype(np.float32)}


def export_bundle(src: Path, out: Path, opset: int = OPSET, fused: bool = True, fp16: bool = True,
                  batches: tuple[int, ...] = engine_spec.DEFAULT_PROFILE_BATCHES, overwrite: bool = False) -> dict:
    """Write bundle ``out`` with the re-exported graphs of bundle ``src``; returns the export report."""
    import torch

    from cytoedge.runtime.backends.torch_backend import load_torch_denoiser

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise BundleError(f"export writes a new bundle: --out {out} must differ from the source bundle")
    if (out / MANIFEST).exists() and not overwrite:
        raise BundleError(f"{out} already holds a bundle; pass --overwrite to replace it")
    bundle = ModelBundle.load(src)
    model = load_torch_denoiser(bundle)
    size = bundle.input_size
    out.mkdir(parents=True, exist_ok=True)
    probe = _probe_inputs(bundle)
    den_names = ("x_t", "timestep", "class_id")
    err_names = ("x0", "noise", "timestep", "class_id", "weight")

    den_spec = engine_spec.denoiser_spec(size, 3, batches)
    example = tuple(torch.from_numpy(probe[n][:2]) for n in den_names)
    export_network(model, den_spec, example, out / "denoiser.onnx", opset)
    with torch.inference_mode():
        eps_torch = model(*(torch.from_numpy(probe[n]) for n in den_names)).numpy()
    eps_onnx = _ort_run(out / "denoiser.onnx", {n: probe[n] for n in den_names})
    report: dict = {"opset": opset, "denoiser_max_abs_error_vs_torch": float(np.abs(eps_onnx - eps_torch).max())}
    networks = {"denoiser": {"file": "denoiser.onnx", **den_spec.to_dict()}}
    if fused:
        err_spec = engine_spec.fused_error_spec(size, 3, batches)
        export_fused_error_onnx(model, out / "denoiser_error.onnx", size, bundle.schedule.alphas_cumprod,
                                bundle.loss_mask(), opset=opset)
        fused_module = denoiser_error_module(model, bundle.schedule.alphas_cumprod, bundle.loss_mask())
        with torch.inference_mode():
            err_torch = fused_module(*(torch.from_numpy(probe[n]) for n in err_names)).numpy()
        err_onnx = _ort_run(out / "denoiser_error.onnx", {n: probe[n] for n in err_names})
        report["denoiser_error_max_rel_error_vs_torch"] = float(np.abs(err_onnx / err_torch - 1).max())
        networks["denoiser_error"] = {"file": "denoiser_error.onnx", **err_spec.to_dict()}
    if fp16:
        report["fp16"] = convert_to_fp16(out / "denoiser.onnx", out / "denoiser_fp16.onnx")
        eps16 = _ort_run(out / "denoiser_fp16.onnx", {n: probe[n] for n in den_names})
        report["denoiser_fp16_max_abs_error_vs_fp32"] = float(np.abs(eps16 - eps_onnx).max())
        networks["denoiser_fp16"] = {"file": "denoiser_fp16.onnx", **den_spec.to_dict()}
        if fused:
            convert_to_fp16(out / "denoiser_error.onnx", out / "denoiser_error_fp16.onnx")
            err16 = _ort_run(out / "denoiser_error_fp16.onnx", {n: probe[n] for n in err_names})
            report["denoiser_error_fp16_max_rel_error_vs_fp32"] = float(np.abs(err16 / err_onnx - 1).max())
            networks["denoiser_error_fp16"] = {"file": "denoiser_error_fp16.onnx",
                                               **engine_spec.fused_error_spec(size, 3, batches).to_dict()}

    manifest = json.loads(json.dumps(bundle.manifest))
    manifest["networks"] = networks
    manifest["files"] = {n["file"]: {"sha256": "0" * 64} for n in networks.values()}
    for key in ("calibration", "domain"):  # fitted on this network's errors, which the export keeps
        if manifest.get(key):
            shutil.copy2(src / manifest[key], out / manifest[key])
            manifest["files"][manifest[key]] = {"sha256": "0" * 64}
    manifest["provenance"] = {**manifest["provenance"], "export": report, "exported_from": str(src)}
    write_manifest(out, manifest)
    log.info("exported %s → %s: %s", src, out, report)
    return report
