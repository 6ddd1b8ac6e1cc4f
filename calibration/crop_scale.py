"""The bundle's crop-scale reference: what the crop-scale estimator reads on the training crops.

    python -m cytoedge.calibration.crop_scale --data ../shared/data/pbc/train --model models/pbc32-ddpm \
        --per-class 100

The training crops' scale is known (the manifest's ``input.um_per_px / source_px_per_model_px``),
so the median of the red-cell estimates over them gives the correction that maps the estimator
onto the model's own scale, and the median central-nucleus diameter gives the white-cell
fallback's reference. Both go into ``manifest.input.crop_scale`` with their provenance.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import ModelBundle, write_manifest
from cytoedge.runtime.cells import read_crop
from cytoedge.runtime.crop_scale import nucleus_um_per_px, red_cell_diameter_px
from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.labelled_data import list_labelled_files, stratified_subset
from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM


def fit_crop_scale_reference(images, known_um_per_px: float) -> dict:
    """Red-cell correction and nucleus diameter (µm) from crops at ``known_um_per_px``."""
    red, nucleus = [], []
    for rgb in images:
        diameter = red_cell_diameter_px(rgb)
        if diameter:
            red.append(RED_CELL_DIAMETER_UM / diameter)
        inverse = nucleus_um_per_px(rgb, 1.0)  # 1 / nucleus diameter in px
        if inverse:
            nucleus.append(1.0 / inverse)
    if len(red) < 20 or len(nucleus) < 20:
        raise CalibrationError(f"crop-scale reference: {len(red)} crops with measurable red cells and "
                               f"{len(nucleus)} with a nucleus; at least 20 of each are needed")
    return {"red_cell_correction": round(known_um_per_px / float(np.median(red)), 5),
            "nucleus_diameter_um": round(float(np.median(nucleus)) * known_um_per_px, 4),
            "crops_red_cells": len(red), "crops_nucleus": len(nucleus)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the training crops, DIR/<class>/<image>")
    p.add_argument("--model", type=Path, required=True, help="bundle whose manifest gets input.crop_scale")
    p.add_argument("--per-class", type=int, default=100)
    args = p.parse_args(argv)
    bundle = ModelBundle.load(args.model)
    if not bundle.crop_scale_estimators:
        raise SystemExit(f"{args.model}: input.crop_scale.estimate_from is empty (the bundle never estimates a "
                         "crop's scale), so there is no estimator reference to fit")
    files, labels, _ = list_labelled_files(args.data, bundle.class_names)
    pick = stratified_subset(labels, args.per_class, seed=1)
    known = round(bundle.crop_um_per_px, 6)
    fitted = fit_crop_scale_reference((read_crop(files[i]) for i in pick), known)
    manifest = bundle.manifest
    manifest["input"]["crop_scale"] = {
        **fitted, "method": "red-cell granulometry (runtime/scale.py) and central-nucleus diameter, median over "
                            "crops at the training scale",
        "provenance": {"data": str(args.data), "per_class": args.per_class, "seed": 1, "known_um_per_px": known,
                       "command": "python -m cytoedge.calibration.crop_scale", "date": time.strftime("%Y-%m-%d")}}
    write_manifest(args.model, manifest)
    print(f"{args.model}: input.crop_scale = {fitted}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
