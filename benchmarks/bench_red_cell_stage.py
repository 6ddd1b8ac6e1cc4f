"""What reading a smear's red cells adds to a slide: seconds, red cells per second, sample size.

A generated smear (the demo's class mix, drawn red cells) is scored twice with the bundled models, with
and without the red-cell stage, on the same backend and threads; the difference is the stage's cost.
The drawn red cells are discs, not scanned cells: this measures cost, not accuracy (that is
bench_rbc_model.py on Chula's held-out fields).

    python benchmarks/bench_red_cell_stage.py --cells 250 --write
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=250, help="white cells on the generated smear")
    ap.add_argument("--target", type=int, default=1000, help="red cells sampled per slide")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from cytoedge.models import default_bundle_path, red_cell_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.commands.demo import demo_classes
    from cytoedge.runtime.red_cells import RedCellReader, RedCellSampling
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer, score_slide
    from cytoedge.runtime.sources import open_source
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear, write_smear_files

    bundle = ModelBundle.load(default_bundle_path())
    backend = create_backend(bundle, "auto", threads=args.threads)
    red = ModelBundle.load(red_cell_bundle_path())
    red_backend = create_backend(red, "auto", threads=args.threads)
    classes = demo_classes(bundle.class_names, args.cells)
    smear = generate_smear(bundle, backend, SmearSpec(n_white=len(classes), classes=tuple(classes), ddim_steps=10))
    options = ScoringOptions(um_per_px=smear.um_per_px, heatmaps=False)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        png = write_smear_files(smear, Path(tmp))[0]
        for name, reader in (("white cells only", None),
                             ("with red cells", RedCellReader(red, red_backend, RedCellSampling(args.target)))):
            t0 = time.perf_counter()
            scorer = SlideScorer(bundle, backend, "fast", options, red_cells=reader)
            entry = score_slide(scorer, open_source(png, smear.um_per_px))
            seconds[name] = time.perf_counter() - t0
    reading = entry["summary"]["red_cells"]
    stage = scorer.timings["red_cells"]
    n = reading["red_cells_classified"]
    body = (f"Generated smear: {len(entry['cells'])} white cells found, {smear.n_red} red cells drawn, "
            f"{smear.rgb.shape[1]}×{smear.rgb.shape[0]} px at {smear.um_per_px} µm/px; backend {backend.name}, "
            f"{args.threads} threads; red-cell model {red.name}.\n\n"
            "| | seconds per slide |\n|---|---|\n"
            f"| white cells only | {seconds['white cells only']:.1f} |\n"
            f"| with red cells (sample target {args.target}: {n} classified of {reading['separated_red_cells_seen']} "
            f"separated cells met) | {seconds['with red cells']:.1f} |\n\n"
            f"The red-cell stage took {stage:.1f} s: {n / stage:.0f} red cells/s (detection, sampling and the "
            f"calibrated race); added per slide: {seconds['with red cells'] - seconds['white cells only']:.1f} s "
            f"(issue target ≤ 30 s for a 1,000-cell reading on 2 cores).")
    print(body)
    if args.write:
        write_section("red-cell-stage", "Red cells in whole smears: what the reading costs", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
