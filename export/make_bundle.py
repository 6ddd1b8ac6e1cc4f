"""Turn a training run (checkpoint + config) into a model bundle: ONNX denoiser + manifest.

    python -m cytoedge.export.make_bundle --run runs/pbc32 --out models/pbc32-ddpm

The EMA weights are exported; the manifest records the architecture, schedule, input scale,
stain reference and provenance (data, steps, minutes, seed, date, code commit).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import subprocess
from pathlib import Path

import cv2
import numpy as np

from cytoedge.export.onnx_export import export_denoiser_onnx, max_abs_error_vs_torch
from cytoedge.runtime.bundle import FORMAT_VERSION, write_manifest
from cytoedge.runtime.stain import fit_reference

log = logging.getLogger(__name__)

# PBC crops as stored in ../shared/data are ~180 px wide with red cells ~37 px across (7.5 µm):
# ~0.2 µm per source pixel. The model sees 3 source pixels per model pixel. A run whose config has no
# "bundle" block is a white-cell (PBC) run and gets these; the red-cell config states its own
# (training/configs/rbc32.json).
PBC_BUNDLE = {
    "cell_type": "white",
    "abnormal_classes": ["erythroblast", "ig"],
    "source_crop_px": 180.0,
    "source_um_per_px": 0.2,
    "scale_provenance": "PBC crops here: red cells ~37 px = 7.5 µm, so ~0.2 µm/px; model sees 3 px per px",
    "split": "pbc/train (calibration and evaluation use pbc/calib, disjoint by content hash)",
}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stain_reference(images_rgb: np.ndarray) -> dict:
    """Mean and std of each CIELAB channel over the training crops (Reinhard normalisation target), and
    the other stain methods' targets over the same crops (runtime/stain.py)."""
    lab = np.stack([cv2.cvtColor(im, cv2.COLOR_RGB2LAB) for im in images_rgb]).reshape(-1, 3).astype(np.float64)
    return {"method": "reinhard", "space": "opencv-lab-uint8", "mean": lab.mean(0).round(3).tolist(),
            "std": lab.std(0).round(3).tolist(), **fit_reference(images_rgb)}


def build_manifest(cfg: dict, state: dict, train_images: np.ndarray, name: str) -> dict:
    from cytoedge.training.train_denoiser import conditioning_ids, trained_classes

    classes = trained_classes(cfg)
    unet = {**cfg["unet"], "num_classes": conditioning_ids(cfg)}
    spec = cfg.get("bundle", PBC_BUNDLE)
    source_px_per_model_px = spec["source_crop_px"] / cfg["cache_size"] * cfg["zoom"]
    null = conditioning_ids(cfg) > len(classes)
    description = spec.get("description") or (
        f"Class-conditional pixel-space DDPM denoiser for peripheral-blood white cells (PBC, {len(classes)} classes"
        + (", plus a null class: the unconditional prediction)" if null else ")"))
    crop_scale = {"crop_scale": spec["crop_scale"]} if "crop_scale" in spec else {}
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        **({"cell_type": spec["cell_type"]} if spec["cell_type"] != "white" else {}),
        "class_names": classes,
        "abnormal_classes": [c for c in spec["abnormal_classes"] if c in classes],
        **({"null_class_id": len(classes)} if null else {}),
        "excluded_classes": cfg.get("exclude_classes", []),
        "input": {
            "size": unet["image_size"], "channels": 3, "channel_order": "RGB", "layout": "NCHW",
            "um_per_px": round(spec["source_um_per_px"] * source_px_per_model_px, 4),
            "source_px_per_model_px": source_px_per_model_px,
            "scale_provenance": spec["scale_provenance"],
            "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "note": "RGB [0,1] -> [-1,1]"},
            "resample": "area downscale to model scale, then bilinear affine (rotation/flip) cut around the cell",
            **crop_scale,
        },
        "stain_reference": stain_reference(train_images),
        "noise_schedule": cfg["noise_schedule"],
        "prediction_type": "epsilon",
        "loss_mask": {"kind": "disc", "radius": cfg["mask_radius"]},
        "networks": {"denoiser": {"file": "denoiser.onnx", "inputs": {"x_t": "float32[B,3,H,W]",
                                  "timestep": "int64[B]", "class_id": "int64[B]"}, "outputs": {"eps": "float32[B,3,H,W]"}}},
        "architecture": {"kind": "ClassConditionalUNet", "config": unet},
        "files": {"denoiser.onnx": {"sha256": "0" * 64}},
        "provenance": {
            "data": cfg.get("data", "../shared/data/pbc/train"),
            "split": spec["split"],
            "steps": int(state["step"]), "train_minutes": round(state["elapsed"] / 60, 1),
            "initialised_from": cfg.get("init_from"),
            "batch_size": cfg["batch_size"], "seed": cfg["seed"],
            "class_balance_power": cfg["class_balance_power"], "augment": cfg.get("augment"),
            "null_class_prob": cfg.get("null_class_prob", 0.0),
            "objective": {"mse": 1.0, "disc_weight": cfg["disc_weight"], "disc_batch": cfg["disc_batch"],
                          "disc_t_range": cfg["disc_t_range"]},
            "weights": "EMA", "ema_decay": cfg["ema_decay"],
            "date": dt.date.today().isoformat(), "code_commit": git_commit(),
            "trainer": "python -m cytoedge.training.train_denoiser",
        },
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    from cytoedge.runtime.backends.torch_unet import ClassConditionalUNet, UNetConfig
    from cytoedge.training.pbc_data import load_cell_set
    from cytoedge.training.train_denoiser import conditioning_ids, trained_classes

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default="cytoedge-pbc32-ddpm")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle's files")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if (args.out / "manifest.json").exists() and not args.overwrite:
        raise SystemExit(f"{args.out} already holds a bundle; pass --overwrite to replace it")
    cfg = json.loads((args.run / "config.json").read_text())
    state = torch.load(args.run / "ckpt.pt", weights_only=False)
    model = ClassConditionalUNet(UNetConfig.from_dict({**cfg["unet"], "num_classes": conditioning_ids(cfg)}))
    model.load_state_dict(state["ema"])
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_denoiser_onnx(model, args.out / "denoiser.onnx", model.config.image_size)
    err = max_abs_error_vs_torch(model, onnx_path, model.config.image_size)
    log.info("exported %s: max |ORT - torch| = %.2e", onnx_path, err)
    data = load_cell_set(Path(cfg.get("data", "../shared/data/pbc/train")), args.cache, cfg["cache_size"], trained_classes(cfg))
    manifest = build_manifest(cfg, state, data.images[::10], args.name)
    manifest["provenance"]["export_max_abs_error_vs_torch"] = err
    old = args.out / "manifest.json"
    if old.exists():
        previous = json.loads(old.read_text())
        if previous.get("calibration"):
            manifest["calibration"] = previous["calibration"]
            manifest["files"][previous["calibration"]] = {"sha256": "0" * 64}
        if previous.get("input", {}).get("crop_scale"):  # a property of the training crops, not the weights
            manifest["input"]["crop_scale"] = previous["input"]["crop_scale"]
    write_manifest(args.out, manifest)
    log.info("wrote bundle %s (step %d)", args.out, state["step"])


if __name__ == "__main__":
    main()
