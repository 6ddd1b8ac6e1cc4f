"""Where the counterfactual heatmaps put their evidence, on a smear of cells the bundled model drew.

A map that a reader can trust points at the cell, not at the plasma or the neighbouring red cells. For
every cell of a generated smear (the demo's class mix) this scores the slide with a heatmap for every
cell and measures the share of each map's positive evidence (the pixels arguing for the predicted
class) that lies

- inside the cell's mask as the report draws it (nucleus outline grown by 3 µm, kept to the
  stained foreground: runtime/cell_views.py), and
- inside the disc the cell was drawn in (known from the smear's ground truth).

Beside each share stands the share of the view's area the region covers: what a map spread evenly
would score.

    python benchmarks/bench_heatmaps.py --cells 60 --write
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=60)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps per drawn cell (the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()

    import tempfile

    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.cell_views import cut_cell_view, view_side_px
    from cytoedge.runtime.commands.demo import demo_classes
    from cytoedge.runtime.detection import DetectionSettings, detect_cells
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
    from cytoedge.runtime.sources import open_source
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, write_smear_files

    bundle = ModelBundle.load(default_bundle_path())
    backend = create_backend(bundle, "auto", threads=args.threads)
    classes = demo_classes(bundle.class_names, args.cells)
    smear = generate_smear(bundle, backend, SmearSpec(n_white=len(classes), classes=tuple(classes),
                                                      ddim_steps=args.steps, seed=args.seed))
    um = smear.um_per_px
    scorer = SlideScorer(bundle, backend, "fast", ScoringOptions(um_per_px=um, heatmap_cells="all",
                                                                 max_heatmaps=10 ** 6))
    with tempfile.TemporaryDirectory() as tmp:
        png = write_smear_files(smear, Path(tmp))[0]
        records = list(scorer.score_source(open_source(png, um)))
    maps = scorer.pictures.heatmaps
    size = bundle.input_size
    side = view_side_px(size * bundle.um_per_px, um)
    detections = detect_cells(smear.rgb, um, DetectionSettings()).white

    in_mask, mask_area, in_disc = [], [], []
    disc_r = 0.42 * size  # the drawn cell's disc, in model pixels (runtime/synthetic_smear.py)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for t in smear.truth:
        x0, y0, x1, y1 = t["bbox"]
        inside = [r for r in records if x0 <= r["centre"][0] <= x1 and y0 <= r["centre"][1] <= y1]
        if not inside:
            continue
        r = min(inside, key=lambda r: np.hypot(r["centre"][0] - t["centre"][0], r["centre"][1] - t["centre"][1]))
        m = np.maximum(maps[r["id"]], 0.0)
        if m.sum() <= 0:
            continue
        det = min(detections, key=lambda d: np.hypot(d.cx - r["centre"][0], d.cy - r["centre"][1]))
        mask = cut_cell_view(smear.rgb, det, side, um).mask
        in_mask.append(r["heatmap"]["inside_cell_fraction"])
        mask_area.append(float(mask.mean()))
        f = bundle.um_per_px / um  # source px per model px
        dx, dy = (t["centre"][0] - r["centre"][0]) / f, (t["centre"][1] - r["centre"][1]) / f
        disc = np.hypot(xx - size / 2 - dx, yy - size / 2 - dy) <= disc_r
        in_disc.append(float((m * disc).sum() / m.sum()))
    in_mask, mask_area, in_disc = map(np.asarray, (in_mask, mask_area, in_disc))
    disc_area = np.pi * disc_r ** 2 / size ** 2
    body = (
        f"{len(in_mask)} drawn cells of a generated smear ({args.cells} cells in the demo's class mix, "
        f"DDIM {args.steps} steps, seed {args.seed}), each given a heatmap (the calibration's {len(scorer._plan.timesteps)} "
        f"probes, weighted, smoothed {1.0:g} µm).\n\n"
        "| region | share of positive evidence inside: mean | median | cells with > 50 % | share of the view's area |\n"
        "|---|---|---|---|---|\n"
        f"| the cell's mask (as drawn in the report) | {in_mask.mean():.2f} | {np.median(in_mask):.2f} | "
        f"{(in_mask > 0.5).mean():.0%} | {mask_area.mean():.2f} |\n"
        f"| the disc the cell was drawn in | {in_disc.mean():.2f} | {np.median(in_disc):.2f} | "
        f"{(in_disc > 0.5).mean():.0%} | {disc_area:.2f} |\n\n"
        "A map spread evenly over the view would score the region's share of the area.")
    print(body)
    if args.write:
        write_section("heatmaps", "Heatmaps: where the evidence lies (drawn cells)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
