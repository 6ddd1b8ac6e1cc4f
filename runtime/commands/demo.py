"""``cytoedge demo``: make a synthetic smear from the bundled model and score it end to end.

The smear has known ground truth (each white cell's class and position), so the demo also
prints how many cells were found and how many were given their drawn class.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import (add_guidance_argument, add_model_arguments, add_red_cell_arguments,
                                              add_scoring_arguments, load_bundle_and_backend)
from cytoedge.runtime.commands.score import add_output_arguments, score_paths

# A differential with a few immature cells, so the triage has something to say.
DEMO_MIX = {"neutrophil": 52, "lymphocyte": 26, "monocyte": 6, "eosinophil": 4, "basophil": 1, "ig": 8,
            "erythroblast": 3}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a synthetic smear and score it", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("cytoedge-demo"), help="output folder")
    p.add_argument("-n", type=int, default=100, help="white cells on the smear")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per cell")
    p.add_argument("--seed", type=int, default=0)
    add_guidance_argument(p)
    p.add_argument("--dicom", action="store_true", help="write and score the smear as a DICOM WSI instead of PNG")
    add_model_arguments(p)
    add_scoring_arguments(p)
    add_red_cell_arguments(p)
    add_output_arguments(p)
    p.set_defaults(func=run)


def demo_classes(bundle_classes: list[str], n: int) -> list[str]:
    """``n`` class names in DEMO_MIX proportions (classes the model lacks are skipped)."""
    mix = {c: w for c, w in DEMO_MIX.items() if c in bundle_classes}
    names = list(mix)
    counts = np.floor(np.array([mix[c] for c in names], float) / sum(mix.values()) * n).astype(int)
    counts[0] += n - counts.sum()
    return [c for c, k in zip(names, counts) for _ in range(k)]


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.sampler import guidance_scale
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, match_truth, write_smear_files

    bundle, backend, estimator = load_bundle_and_backend(args)
    classes = demo_classes(bundle.class_names, args.n)
    rng = np.random.default_rng(args.seed)
    classes = [classes[i] for i in rng.permutation(len(classes))]
    spec = SmearSpec(n_white=len(classes), classes=tuple(classes), ddim_steps=args.steps, seed=args.seed,
                     guidance=args.guidance)
    print(f"drawing {len(classes)} white cells from {bundle.name} (DDIM {args.steps} steps, "
          f"guidance {guidance_scale(bundle, args.guidance):g})…", file=sys.stderr)
    smear = generate_smear(bundle, backend, spec)
    files = write_smear_files(smear, args.out / "slide", dicom=args.dicom)
    slide = next(p for p in files if p.suffix == (".dcm" if args.dicom else ".png"))
    if args.um_per_px is None and not args.dicom:
        args.um_per_px = smear.um_per_px
    document, errors = score_paths([slide], args.out, args, bundle, backend, estimator)
    entry = document["slides"][0]
    if "error" in entry:
        return 1
    found = match_truth(smear.truth, entry["cells"])
    s = entry["summary"]
    print(f"triage: {s['triage']['level']} — " + "; ".join(s["triage"]["reasons"]))
    if s["domain_alarm"]["raised"]:
        print("note: these cells were drawn by the model itself, smoother and more typical of their classes than "
              "scanned cells, so the out-of-domain alarm is raised, as it should be for images that are not scans")
    if s.get("red_cells"):
        print(f"note: the smear's red cells are drawn discs, not scans: the red-cell reading "
              f"({s['red_cells']['red_cells_classified']} cells) shows the mechanism, not a morphology result")
    print("differential: " + ", ".join(f"{c} {v:.0%}" for c, v in s["differential"].items()))
    print(f"ground truth: {found['detected']}/{found['truth']} white cells found, {found['extra']} extra; "
          f"{found['class_agreement']:.0%} of found cells given the class they were drawn as")
    (args.out / "demo_truth_match.json").write_text(json.dumps(found, indent=1) + "\n")
    print(f"report: {args.out}")
    return 1 if errors else 0
