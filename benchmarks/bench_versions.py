"""Whole-smear throughput of this checkout against an earlier commit, side by side in one run.

A refactor must not make a slide slower. This scores the same generated smear with both versions,
alternating them (A B A B …) in fresh processes on the same machine, so drift in the machine's load
falls on both; it reports each version's median seconds and cells/s, their ratio, and whether the
records agree (the same cells and classes). The earlier commit is exported with ``git archive`` into
a temporary folder and imported from there.

    python benchmarks/bench_versions.py --baseline c791d97 [--cells 60] [--repeats 3] [--threads 1] [--write]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = ("runtime", "export", "kernels", "calibration", "training", "models")

# Runs in a fresh process with the version under test first on sys.path; the API it uses
# (SlideScorer, ScoringOptions, open_source) is the same in both versions.
CHILD = r'''
import json, sys, time
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
from cytoedge.runtime.sources import open_source
bundle = ModelBundle.load(default_bundle_path())
backend = OnnxRuntimeBackend(bundle, threads=int(sys.argv[3]))
scorer = SlideScorer(bundle, backend, "fast", ScoringOptions(um_per_px=float(sys.argv[2])))
t0 = time.perf_counter()
cells = [(r["centre"], r["class"]) for r in scorer.score_source(open_source(sys.argv[1], float(sys.argv[2])))]
print(json.dumps({"seconds": time.perf_counter() - t0, "cells": cells}))
'''


def export_commit(commit: str, folder: Path) -> Path:
    """``commit``'s stage folders under ``folder``, importable as ``cytoedge.*`` from the returned path."""
    src, pkg = folder / "src", folder / "pkg" / "cytoedge"
    src.mkdir(parents=True)
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, *STAGE_FOLDERS], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    for name in STAGE_FOLDERS:
        (pkg / name).symlink_to(src / name)
    return pkg.parent


def score_once(smear: Path, um_per_px: float, threads: int, path: Path | None) -> dict:
    env_path = [str(path)] if path else []
    code = f"import sys; sys.path[:0] = {env_path!r}\n" + CHILD
    out = subprocess.run([sys.executable, "-c", code, str(smear), str(um_per_px), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--cells", type=int, default=60, help="white cells drawn on the smear")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = ap.parse_args()
    import cv2
    from bench_slide import load, make_smear

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], capture_output=True,
                          text=True, check=True).stdout.strip()
    bundle, backend = load(args.threads)
    smear = make_smear(bundle, backend, args.cells)
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "smear.png"
        cv2.imwrite(str(png), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
        versions = {f"{base} (baseline)": export_commit(args.baseline, Path(tmp) / "baseline"),
                    f"{head} (this checkout)": None}
        runs: dict[str, list[dict]] = {v: [] for v in versions}
        for _ in range(args.repeats):
            for name, path in versions.items():
                runs[name].append(score_once(png, smear.um_per_px, args.threads, path))
    names = list(versions)
    seconds = {v: statistics.median(r["seconds"] for r in runs[v]) for v in names}
    cells = {v: len(runs[v][0]["cells"]) for v in names}
    same = runs[names[0]][0]["cells"] == runs[names[1]][0]["cells"]
    rows = ["| version | cells | median seconds | cells/s |", "|---|---|---|---|"]
    rows += [f"| {v} | {cells[v]} | {seconds[v]:.2f} | {cells[v] / seconds[v]:.1f} |" for v in names]
    ratio = (cells[names[1]] / seconds[names[1]]) / (cells[names[0]] / seconds[names[0]])
    body = (f"One generated smear ({args.cells} white cells drawn, {smear.rgb.shape[1]}×{smear.rgb.shape[0]} px at "
            f"{smear.um_per_px} µm/px), scored by `SlideScorer` with default options (fast estimator, heatmaps of "
            f"flagged cells, ONNX Runtime CPU, {args.threads} thread), each version {args.repeats} times in fresh "
            f"processes, alternating.\n\n" + "\n".join(rows) +
            f"\n\nThis checkout's cells/s over the baseline's: **{ratio:.2f}×**. Records: "
            f"{'the same cells and classes' if same else 'DIFFERENT cells or classes'} in both versions.\n")
    print(body)
    if args.write:
        write_section("versions", "Whole-smear scoring: this checkout vs an earlier commit", body)


if __name__ == "__main__":
    main()
