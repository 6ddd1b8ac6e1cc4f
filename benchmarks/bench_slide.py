"""Whole-smear scoring benchmarks, written to the "Whole-smear scoring" section of RESULTS.md.

1. End to end on a generated smear of N white cells (default 100): cells/s and time per stage.
2. Reference vs fast estimator end to end on the same fields: real PBC crops where ../shared/data
   has them, else fields of the generated smear (a few only: the reference protocol costs seconds
   per cell on a CPU; per-field times are compared).
3. Peak RSS scoring a generated 50,000 × 50,000 DICOM WSI, in a fresh process. The file is
   TILED_SPARSE: only frames with cells are stored (copies of the smear's frames spread over the
   slide), so it is small on disk; the reader still walks the whole 50,000² frame grid.

    python benchmarks/bench_slide.py [--cells 100] [--reference-cells 8] [--threads 1] [--skip-rss]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

STAGES = ("scale", "read", "detect", "views", "stain", "resample", "classify", "heatmap")


def load(threads: int):
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle

    bundle = ModelBundle.load(default_bundle_path())
    return bundle, OnnxRuntimeBackend(bundle, threads=threads)


def make_smear(bundle, backend, n: int, seed: int = 0):
    from cytoedge.runtime.commands.demo import demo_classes
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    return generate_smear(bundle, backend, SmearSpec(n_white=n, classes=tuple(demo_classes(bundle.class_names, n)),
                                                     seed=seed))


def score_array(bundle, backend, rgb, um, estimator, heatmaps=True):
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
    from cytoedge.runtime.sources import Tile

    scorer = SlideScorer(bundle, backend, estimator, ScoringOptions(um_per_px=um, heatmaps=heatmaps))

    class ArraySource:
        name, width, height, um_per_px = "generated", rgb.shape[1], rgb.shape[0], um

        def tiles(self, tile_size, overlap):
            h, w = rgb.shape[:2]
            for y in range(0, h, tile_size):
                for x in range(0, w, tile_size):
                    x0, y0 = max(x - overlap, 0), max(y - overlap, 0)
                    yield Tile(rgb[y0:min(y + tile_size + overlap, h), x0:min(x + tile_size + overlap, w)], x0, y0,
                               (x, y, min(x + tile_size, w), min(y + tile_size, h)), "generated")

        def close(self):
            pass

    t0 = time.perf_counter()
    cells = list(scorer.score_source(ArraySource()))
    return cells, time.perf_counter() - t0, dict(scorer.timings), scorer.summary()


def end_to_end(bundle, backend, smear) -> tuple[str, list[dict]]:
    cells, total, stages, summary = score_array(bundle, backend, smear.rgb, smear.um_per_px, "fast")
    rows = "\n".join(f"| {k} | {stages.get(k, 0):.3f} | {stages.get(k, 0) / max(len(cells), 1) * 1e3:.1f} |"
                     for k in STAGES)
    flagged = sum(1 for c in cells if "heatmap" in c)
    text = (f"### End to end, fast estimator, generated smear ({len(smear.truth)} white cells drawn, "
            f"{smear.rgb.shape[1]}×{smear.rgb.shape[0]} px at {smear.um_per_px} µm/px)\n\n"
            f"{len(cells)} cells scored in {total:.2f} s = **{len(cells) / total:.1f} cells/s** "
            f"(incl. {flagged} counterfactual heatmaps; triage {summary['triage']['level']}).\n\n"
            f"| stage | s | ms/cell |\n|---|---|---|\n{rows}\n")
    return text, cells


def smear_fields(smear, cells, n: int) -> list[tuple[np.ndarray, float]]:
    """40-µm fields cut around the first ``n`` scored cells of the generated smear."""
    half = int(20 / smear.um_per_px)
    out = []
    for c in cells[:n]:
        x, y = (int(v) for v in c["centre"])
        out.append((smear.rgb[max(y - half, 0):y + half, max(x - half, 0):x + half], smear.um_per_px))
    return out


def real_fields(bundle, data: Path, n: int) -> list[tuple[np.ndarray, float]]:
    """``n`` real PBC crops (held-out half, spread over the classes), each scored as a field of its own.
    Drawn cells are easier than real ones (guided sampling makes them typical), so the reference
    protocol's early stop fires sooner on them and the speed-up would be understated."""
    from cytoedge.runtime.cells import default_crop_um_per_px, read_rgb
    from cytoedge.runtime.labelled_data import list_labelled_files, select_half, stratified_subset

    files, labels, _ = list_labelled_files(data, bundle.class_names)
    files, labels = select_half(files, labels, "held-out")
    pick = stratified_subset(labels, -(-n // len(bundle.class_names)), seed=3)[:n]
    return [(read_rgb(files[i]), default_crop_um_per_px(bundle)) for i in pick]


def reference_vs_fast(bundle, backend, fields: list[tuple[np.ndarray, float]], what: str) -> str:
    """Both estimators end to end (detection included, heatmaps off) on the same fields."""
    times = {"fast": 0.0, "reference": 0.0}
    nfe = {"fast": 0, "reference": 0}
    agree = 0
    for rgb, um in fields:
        got = {}
        for est in ("fast", "reference"):
            recs, dt, _, _ = score_array(bundle, backend, rgb, um, est, heatmaps=False)
            times[est] += dt
            nfe[est] += sum(r["nfe"] for r in recs)
            got[est] = [r["class"] for r in recs]
        agree += got["fast"] == got["reference"]
    n = len(fields)
    ratio = times["reference"] / max(times["fast"], 1e-9)
    return (f"### Reference vs fast estimator, end to end\n\nThe same {n} fields ({what}; detection included): "
            f"fast {times['fast'] / n:.3f} s/field ({nfe['fast'] / n:.0f} NFE/field), "
            f"reference {times['reference'] / n:.1f} s/field ({nfe['reference'] / n:.0f} NFE/field): "
            f"**{ratio:.0f}× faster** (goal ≥ 30×); same classes on {agree}/{n} fields.\n")


RSS_CHILD = r'''
import json, resource, sys, time
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
from cytoedge.runtime.sources import open_source
bundle = ModelBundle.load(default_bundle_path())
backend = OnnxRuntimeBackend(bundle, threads=int(sys.argv[2]))
scorer = SlideScorer(bundle, backend, "fast", ScoringOptions())
t0 = time.perf_counter()
source = open_source(sys.argv[1])
n = sum(1 for _ in scorer.score_source(source))
s = scorer.summary()
print(json.dumps({"cells": n, "seconds": time.perf_counter() - t0, "tiles": scorer.tally.tiles,
                  "frames": source.n_frames, "width": source.width, "height": source.height,
                  "triage": s["triage"]["level"], "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def big_slide_rss(smear, threads: int, side: int = 50_000, frame: int = 512, copies: int = 4) -> str:
    from cytoedge.runtime.synthetic_smear import frames_of, write_wsi_dicom

    tiles = [t for t in frames_of(smear.rgb, frame)]
    rng = np.random.default_rng(0)
    grid = side // frame
    frames, used = [], set()
    for _ in range(copies):
        r0, c0 = (int(v) for v in rng.integers(0, grid - 8, 2))
        for r, c, t in tiles:
            key = (r0 * frame + r, c0 * frame + c)
            if key[0] + frame <= side and key[1] + frame <= side and key not in used:
                used.add(key)
                frames.append((key[0], key[1], t))
    frames.sort(key=lambda f: (f[0], f[1]))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_wsi_dicom(Path(tmp) / "big.dcm", frames, (side, side), frame, smear.um_per_px, codec="jpeg",
                               organisation="TILED_SPARSE")
        size_mb = path.stat().st_size / 1e6
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(threads)], capture_output=True,
                             text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gib = r["maxrss_kib"] / 2**20
    return (f"### Peak memory, {side:,} × {side:,} DICOM WSI\n\nTILED_SPARSE, JPEG, {r['frames']} frames of "
            f"{frame}² stored ({size_mb:.1f} MB: {copies} copies of the smear's frames at random places; the "
            f"{grid}×{grid} grid is otherwise empty glass), {smear.um_per_px} µm/px from the file: "
            f"{r['cells']} cells in {r['tiles']} tiles, {r['seconds']:.1f} s, **peak RSS {gib:.2f} GiB** "
            f"(goal ≤ 2 GiB; the process's ru_maxrss, model and runtime included).\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100)
    ap.add_argument("--reference-cells", type=int, default=8)
    ap.add_argument("--reference-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "pbc" / "calib", help="real labelled crops for the reference comparison (else drawn cells)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    bundle, backend = load(args.threads)
    smear = make_smear(bundle, backend, args.cells)
    parts = []
    text, cells = end_to_end(bundle, backend, smear)
    parts.append(text)
    print(text)
    if args.reference_cells:
        if args.reference_data.is_dir():
            fields = real_fields(bundle, args.reference_data, args.reference_cells)
            what = f"real PBC crops of `{args.reference_data.name}`, held-out half, spread over the classes"
        else:
            fields = smear_fields(smear, cells, args.reference_cells)
            what = "40-µm fields of the generated smear (no real data here)"
        parts.append(reference_vs_fast(bundle, backend, fields, what))
        print(parts[-1])
    if not args.skip_rss:
        parts.append(big_slide_rss(smear, args.threads))
        print(parts[-1])
    write_section("whole-smear-bench", "Whole-smear scoring: throughput, estimators, memory",
                  f"ONNX Runtime CPU, {args.threads} thread(s), bundle {bundle.name} ({bundle.sha256[:12]}…).\n\n"
                  + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
