"""``cytoedge synth``: draw cells from the bundled denoiser (DDIM), or compose a synthetic smear.

    cytoedge synth --class neutrophil -n 8 --out cells/         one PNG per cell (model scale)
    cytoedge synth --smear --class ig --class lymphocyte -n 20 --out smear/   smear.png + truth.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytoedge.runtime.commands.common import (add_guidance_argument, add_model_arguments, add_um_per_px_argument,
                                              load_bundle_and_backend)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="sample synthetic cells or a synthetic smear from the model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--class", dest="classes", action="append", default=[], metavar="C",
                   help="class to draw (repeat for several; default: all the model's classes but platelet)")
    p.add_argument("-n", type=int, default=8, help="number of cells")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)
    add_guidance_argument(p)
    p.add_argument("--smear", action="store_true", help="compose the cells into a smear with red cells")
    p.add_argument("--dicom", action="store_true", help="with --smear: also write a DICOM WSI (TILED_FULL, JPEG)")
    add_um_per_px_argument(p, "with --smear: pixel size of the smear", default=0.2)
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.cells import write_image_with_scale
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.sampler import guidance_scale
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, sample_cells, write_smear_files

    if args.n < 1:
        raise CytoedgeError(f"-n must be at least 1, got {args.n}")
    if args.steps < 1:
        raise CytoedgeError(f"--steps must be at least 1, got {args.steps}")
    bundle, backend, _ = load_bundle_and_backend(args)
    if args.smear and bundle.cell_type != "white":
        raise CytoedgeError(f"--smear places the model's cells as the white cells of a smear of drawn red cells; "
                            f"{bundle.path} reads {bundle.cell_type} cells (drop --smear to draw single cells)")
    pool = args.classes or [c for c in bundle.class_names if c != "platelet"]
    unknown = sorted(set(pool) - set(bundle.class_names))
    if unknown:  # refused before --out is created
        raise CytoedgeError(f"unknown class {unknown}; the model knows {bundle.class_names}")
    if not pool:
        raise CytoedgeError(f"no class to draw: give --class (the model knows {bundle.class_names})")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smear:
        spec = SmearSpec(n_white=args.n, classes=tuple(pool), um_per_px=args.um_per_px, ddim_steps=args.steps,
                         seed=args.seed, guidance=args.guidance)
        smear = generate_smear(bundle, backend, spec)
        for path in write_smear_files(smear, args.out, dicom=args.dicom):
            print(path)
        return 0
    classes = [pool[k % len(pool)] for k in range(args.n)]
    cells = sample_cells(bundle, backend, classes, args.steps, args.seed, guidance=args.guidance)
    index = []
    for k, (cls, rgb) in enumerate(zip(classes, cells)):
        path = args.out / f"{k:04d}_{cls}.png"
        write_image_with_scale(path, rgb, bundle.um_per_px)  # the PNG says its µm/px: classify reads it
        index.append({"file": path.name, "class": cls})
    (args.out / "cells.json").write_text(json.dumps({"model": bundle.name, "bundle_sha256": bundle.sha256,
                                                     "um_per_px": bundle.um_per_px, "steps": args.steps,
                                                     "guidance": guidance_scale(bundle, args.guidance),
                                                     "seed": args.seed, "cells": index}, indent=1) + "\n")
    print(f"{len(index)} cells in {args.out}")
    return 0
