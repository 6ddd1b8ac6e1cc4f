"""Site robustness: crops at other scanners' resolutions (PBC resampled), read with default options.

  python benchmarks/bench_site.py [--data ../shared/data/pbc/calib] [--per-class 40] [--only rescale|domain|adapt] [--write]

The held-out half of pbc/calib is resampled ×0.5, ×0.75, ×1.5 and ×2 (standing in for other
analysers' pixel sizes) into a temporary folder and scored by `cytoedge evaluate` as a user runs
it: with default options, i.e. the crop scale estimated from the crops themselves. For contrast
the ×0.5 and ×2 sets are also scored at the scale assumed before estimation existed (the training
crops', 0.2 µm/px). The domain section measures the out-of-domain alarm on PBC held-out crops and
BCCD fields; the adapt section runs `cytoedge adapt` on k = 5, 10, 20 labelled BCCD fields per class
(--draws random draws) and scores the other fields with each adapted bundle. Nothing is written to the
repository but RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
MODEL: Path | None = None  # --model: the bundle measured (default: the bundled model)
ASSUMED = 0.2  # µm/px every crop was read at before the scale was estimated (the training crops')


def write_rescaled(data: Path, out: Path, factor: float, per_class: int) -> int:
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.labelled_data import labelled_subset

    classes = ModelBundle.load(MODEL or default_bundle_path()).class_names
    files, labels = labelled_subset(data, classes, "held-out", per_class)
    for path, label in zip(files, labels):
        bgr = cv2.imread(str(path))
        if factor != 1.0:
            bgr = cv2.resize(bgr, None, fx=factor, fy=factor,
                             interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
        target = out / classes[label] / (path.stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), bgr)
    return len(files)


def evaluate(folder: Path, extra: list[str], threads: int) -> dict:
    report = folder.parent / f"{folder.name}-{len(extra)}.json"
    model = ["--model", str(MODEL)] if MODEL else []
    cmd = [sys.executable, "-m", "cytoedge.runtime.cli", "evaluate", "--data", str(folder), "--half", "all", *model,
           "--threads", str(threads), "--out", str(report), *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(report.read_text())


def bccd_labels(root: Path) -> dict[str, str]:
    """Field name -> WBC type, for BCCD fields labelled with one type."""
    import csv

    labels = {}
    with open(root / "wbc_subtypes.csv") as f:
        for row in csv.DictReader(f):
            kinds = [k.strip().lower() for k in row["wbc_type"].split(",") if k.strip()]
            if len(kinds) == 1:
                labels[row["image"]] = kinds[0]
    return labels


def bccd_cells(root: Path, threads: int, model: Path | None = None, only: set[str] | None = None,
               options=None) -> tuple[list[dict], list[str]]:
    """Records of BCCD fields scored as `cytoedge score` does by default (scale from the red cells,
    stain map per slide; or with ``options``), for fields with one labelled type (of ``only``, if given)
    and exactly one white cell found."""
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
    from cytoedge.runtime.sources import open_source

    labels = {k: v for k, v in bccd_labels(root).items() if only is None or k in only}
    bundle = ModelBundle.load(model or MODEL or default_bundle_path())
    backend = OnnxRuntimeBackend(bundle, threads=threads)
    scorer = SlideScorer(bundle, backend, "fast", options or ScoringOptions(heatmaps=False))
    records, truth = [], []
    for name in sorted(labels):
        path = root / "images" / f"{name}.jpg"
        if not path.is_file():
            continue
        try:
            cells = list(scorer.score_source(open_source(path)))
        except Exception:  # a field whose scale cannot be estimated is simply not counted
            continue
        if len(cells) == 1:
            records.append({**cells[0], "bccd_field": name})
            truth.append(labels[name])
    backend.close()
    return records, truth


def pbc_cells(data: Path, per_class: int, threads: int, stain: str | None = None) -> tuple[list[dict], list[str]]:
    """Records of the held-out half of pbc/calib, classified as `cytoedge classify` does by default (or with
    ``--stain-method stain``)."""
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.cells import crops_to_batch, read_crop
    from cytoedge.runtime.classify_cells import classify_batch, mark_no_cell
    from cytoedge.runtime.crop_scale import estimate_crop_scales
    from cytoedge.runtime.labelled_data import labelled_subset
    from cytoedge.runtime.stain import stain_normaliser

    bundle = ModelBundle.load(MODEL or default_bundle_path())
    backend = OnnxRuntimeBackend(bundle, threads=threads)
    normaliser = stain_normaliser(bundle, stain) if stain else None
    files, labels = labelled_subset(data, bundle.class_names, "held-out", per_class)
    scales, _ = estimate_crop_scales(files, bundle, None, read_crop)
    records = []
    for s in range(0, len(files), 64):
        chunk = files[s:s + 64]
        crops = [read_crop(f) for f in chunk]
        if normaliser is not None:
            crops = [normaliser.normalise(rgb) for rgb in crops]
        batch = crops_to_batch(crops, bundle, [scales.scale(str(f)).um_per_px for f in chunk])
        records += mark_no_cell(classify_batch(batch, bundle, backend), crops)
    backend.close()
    return records, [bundle.class_names[k] for k in labels]


def set_report(records: list[dict], truth: list[str], batch: int = 50, draws: int = 200,
               model: Path | None = None) -> dict:
    """Balanced accuracy, confident-cell accuracy and the alarm rate on random ``batch``-cell runs."""
    import numpy as np

    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.domain_alarm import records_alarm

    domain = ModelBundle.load(model or MODEL or default_bundle_path()).domain
    pred = np.array([r["class"] for r in records])
    true = np.array(truth)
    classes = sorted(set(truth))
    recall = {c: float((pred[true == c] == c).mean()) for c in classes}
    flags = [r["flags"] for r in records]
    confident = np.array([not (f["uncertain"] or f["anomalous"]) for f in flags])
    rng = np.random.default_rng(0)
    raised = []
    for _ in range(draws):
        pick = rng.choice(len(records), size=min(batch, len(records)), replace=False)
        raised.append(records_alarm([records[i] for i in pick], domain)["raised"])
    raised_200 = []
    for _ in range(draws if len(records) >= 400 else 0):
        pick = rng.choice(len(records), size=200, replace=False)
        raised_200.append(records_alarm([records[i] for i in pick], domain)["raised"])
    whole = records_alarm(records, domain)
    return {"cells": len(records), "balanced_accuracy": float(np.mean(list(recall.values()))), "recall": recall,
            "confident_cells": int(confident.sum()),
            "confident_accuracy": float((pred[confident] == true[confident]).mean()) if confident.any() else None,
            "atypical_cells": int(sum(f.get("atypical", False) for f in flags)),
            "alarm_rate_50": float(np.mean(raised)),
            "alarm_rate_200": float(np.mean(raised_200)) if raised_200 else None, "alarm_whole_set": whole}


def garbage_report() -> dict:
    """Crops with no cell in them, at the training-crop scale: each must be anomalous."""
    import numpy as np

    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.cells import crops_to_batch
    from cytoedge.runtime.classify_cells import classify_batch, mark_no_cell

    rng = np.random.default_rng(0)
    crops = {"uniform grey": np.full((180, 180, 3), 128, np.uint8), "black": np.zeros((180, 180, 3), np.uint8),
             "white": np.full((180, 180, 3), 255, np.uint8),
             "noise": rng.integers(0, 256, (180, 180, 3), dtype=np.uint8),
             "pink plasma": np.tile(np.array([228, 200, 205], np.uint8), (180, 180, 1)),
             "blurred noise": cv2.GaussianBlur(rng.integers(0, 256, (180, 180, 3), dtype=np.uint8), (0, 0), 6)}
    bundle = ModelBundle.load(MODEL or default_bundle_path())
    backend = OnnxRuntimeBackend(bundle, threads=2)
    records = mark_no_cell(classify_batch(crops_to_batch(list(crops.values()), bundle), bundle, backend),
                           list(crops.values()))
    backend.close()
    return {name: {"class": r["class"], "anomalous": r["flags"]["anomalous"], "label": r["confidence_label"],
                   "typicality": r["typicality"], "anomaly_score": r["anomaly_score"]}
            for name, r in zip(crops, records)}


def rescale_section(args) -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in FACTORS:
            folder = Path(tmp) / f"x{factor:g}"
            n = write_rescaled(args.data, folder, factor, args.per_class)
            est = evaluate(folder, [], args.threads)
            row = {"factor": factor, "cells": n, "estimated": est["balanced_accuracy"], "scale": est["scale"]}
            if factor in (0.5, 2.0):
                row["assumed"] = evaluate(folder, ["--um-per-px", str(ASSUMED)], args.threads)["balanced_accuracy"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    native = next(r for r in rows if r["factor"] == 1.0)["estimated"]
    lines = ["| resampled | crops | balanced accuracy, default options (scale estimated) | Δ vs ×1 | scale found "
             "(µm/px) / truth | balanced accuracy at the old assumed 0.2 µm/px |", "|---|---|---|---|---|---|"]
    for r in rows:
        found = ", ".join(f"{v:.3f}" for v in r["scale"]["pooled_um_per_px"].values()) or "per crop"
        old = f"{r['assumed']:.3f}" if "assumed" in r else "–"
        lines.append(f"| ×{r['factor']:g} | {r['cells']} | {r['estimated']:.3f} | {r['estimated'] - native:+.3f} | "
                     f"{found} / {ASSUMED / r['factor']:.3f} | {old} |")
    worst = min(r["estimated"] - native for r in rows)
    return (f"Held-out half of `{args.data}`, {args.per_class} crops per class, resampled (area down, cubic up), "
            "scored by `cytoedge evaluate` with default options (fast estimator, bundled model, ONNX Runtime CPU). "
            "The scale of each set is estimated from its crops (red-cell granulometry, pooled over the crops of one "
            "size, corrected by the bundle's `input.crop_scale`).\n\n" + "\n".join(lines) +
            f"\n\nLargest drop from ×1: {-worst:.3f} (target: within 0.02).\n")


def domain_section(args) -> str:
    pbc = set_report(*pbc_cells(args.data, args.per_class, args.threads))
    print("pbc", json.dumps(pbc), flush=True)
    bccd = set_report(*bccd_cells(args.bccd, args.threads)) if args.bccd.is_dir() else None
    print("bccd", json.dumps(bccd), flush=True)
    garbage = garbage_report()
    print("garbage", json.dumps(garbage), flush=True)

    def row(name: str, r: dict | None) -> str:
        if r is None:
            return f"| {name} | not here | | | | | | |"
        conf = "–" if r["confident_accuracy"] is None else f"{r['confident_accuracy']:.3f}"
        r200 = "–" if r["alarm_rate_200"] is None else f"{r['alarm_rate_200']:.0%}"
        whole = r["alarm_whole_set"]
        return (f"| {name} | {r['cells']} | {r['balanced_accuracy']:.3f} | {r['alarm_rate_50']:.0%} | {r200} | "
                f"{'raised' if whole['raised'] else 'not raised'} (shift {whole.get('shift')}, threshold "
                f"{whole.get('threshold')}) | {r['confident_cells']} ({conf} right) | {r['atypical_cells']} |")
    lines = ["| set | cells | balanced accuracy (zero-shot) | alarm raised on 50-cell runs (200 draws) | on 200-cell "
             "runs | on the whole set | cells not uncertain or anomalous (their accuracy) | atypical cells |",
             "|---|---|---|---|---|---|---|---|",
             row(f"PBC held-out half ({args.per_class}/class, crops)", pbc),
             row("BCCD trainval (fields with one typed WBC, `score` defaults)", bccd)]
    junk = "; ".join(f"{k}: {'anomalous' if v['anomalous'] else 'NOT anomalous'} ({v['label']}, typicality "
                     f"{v['typicality']})" for k, v in garbage.items())
    return ("The out-of-domain alarm (runtime/domain_alarm.py; reference fitted by calibration/domain.py on the "
            "fit half of pbc/calib only, `cytoedge calibrate --domain-only`). A run's cells in the confident "
            "column are neither uncertain nor anomalous; under a raised alarm none is labelled confident, so "
            "on sets where it is raised the column counts the cells that would have been.\n\n" + "\n".join(lines) +
            f"\n\nCrops with no cell (180 px at the training scale): {junk}.\n")


def adapt_section(args) -> str:
    """`cytoedge adapt` on k labelled BCCD fields per class (several draws), measured on the other fields."""
    import os

    import numpy as np

    # Draw from the fields in which `score` finds one white cell (adapt skips the others, and a draw
    # of k fields should give k cells).
    records, truth = bccd_cells(args.bccd, args.threads)
    by_class: dict[str, list[str]] = {}
    for record, kind in zip(records, truth):
        by_class.setdefault(kind, []).append(record["bccd_field"])
    by_class = {c: v for c, v in by_class.items() if len(v) >= 10}  # BCCD's one basophil cannot be split
    rows = []
    draws = {"features": args.draws, "finetune": args.finetune_draws}
    runs = [(method, k, draw) for method in args.methods for k in ADAPT_K for draw in range(draws[method])]
    for method, k, draw in runs:
        rng = np.random.default_rng(draw)
        chosen = {c: list(rng.permutation(v)[:min(k, len(v) // 2)]) for c, v in by_class.items()}
        picked = {n for v in chosen.values() for n in v}
        rest = {n for v in by_class.values() for n in v} - picked
        with tempfile.TemporaryDirectory() as tmp:
            data, out = Path(tmp) / "labelled", Path(tmp) / "adapted"
            for c, names in chosen.items():
                (data / c).mkdir(parents=True)
                for n in names:
                    os.symlink((args.bccd / "images" / f"{n}.jpg").resolve(), data / c / f"{n}.jpg")
            model = ["--model", str(MODEL)] if MODEL else []
            t = time.time()
            steps = ["--steps", str(args.finetune_steps)] if method == "finetune" else []
            run = subprocess.run([sys.executable, "-m", "cytoedge.runtime.cli", "adapt", "--data", str(data),
                                  "--fields", "--method", method, *steps, "--out", str(out),
                                  "--threads", str(args.threads), *model], capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"cytoedge adapt failed ({method}, k={k}, draw {draw}):\n{run.stderr[-2000:]}")
            seconds = time.time() - t
            report = set_report(*bccd_cells(args.bccd, args.threads, out, rest), model=out)
        row = {"method": method, "k": k, "draw": draw, "seconds": seconds, **report}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| method | labelled fields per class | draws | cells measured | balanced accuracy (mean ± sd) | alarm on "
             "50-cell runs | confident cells (their accuracy) | adapt seconds |", "|---|---|---|---|---|---|---|---|"]
    for method, k in dict.fromkeys((m, k) for m, k, _ in runs):
        rk = [r for r in rows if r["k"] == k and r["method"] == method]
        acc = np.array([r["balanced_accuracy"] for r in rk])
        conf = [r["confident_accuracy"] for r in rk if r["confident_accuracy"] is not None]
        right = f" ({np.mean(conf):.3f} right)" if conf else ""
        lines.append(f"| {method} | {k} | {len(rk)} | {np.mean([r['cells'] for r in rk]):.0f} | {acc.mean():.3f} ± {acc.std():.3f} | "
                     f"{np.mean([r['alarm_rate_50'] for r in rk]):.0%} | "
                     f"{np.mean([r['confident_cells'] for r in rk]):.0f}{right} | {np.mean([r['seconds'] for r in rk]):.0f} |")
    how = {"features": f"`--method features` ({args.draws} random draws per k)",
           "finetune": f"`--method finetune --steps {args.finetune_steps}` ({args.finetune_draws} draws per k)"}
    return ("`cytoedge adapt --fields`, " + " and ".join(how[m] for m in args.methods) + ", on k BCCD trainval "
            "fields per class (at most half of a class), drawn from the fields in which `score` finds one white "
            "cell; each adapted bundle scores the other fields as `cytoedge score` does. Classes: "
            + ", ".join(f"{c} ({len(v)})" for c, v in by_class.items()) + ".\n\n" + "\n".join(lines) + "\n")


ADAPT_K = (5, 10, 20)
STAIN_METHODS = ("none", "reinhard", "macenko", "histogram")


def stain_section(args) -> str:
    """Each stain method on BCCD fields (one map per field, as `score` fits it) and on PBC held-out crops
    (a map per crop, as `classify --stain-method` fits it), zero-shot."""
    from cytoedge.runtime.slide_scoring import ScoringOptions

    rows = []
    for method in STAIN_METHODS:
        options = ScoringOptions(heatmaps=False, stain_normalise=method != "none",
                                 stain_method="reinhard" if method == "none" else method)
        t = time.time()
        bccd = set_report(*bccd_cells(args.bccd, args.threads, options=options)) if args.bccd.is_dir() else None
        t_bccd, t = time.time() - t, time.time()
        pbc = set_report(*pbc_cells(args.data, args.per_class, args.threads, None if method == "none" else method))
        row = {"method": method, "bccd": bccd, "pbc": pbc, "seconds_bccd": t_bccd, "seconds_pbc": time.time() - t}
        rows.append(row)
        print(json.dumps({k: (v["balanced_accuracy"], v["cells"]) if isinstance(v, dict) else v
                          for k, v in row.items()}), flush=True)
    lines = ["| stain method | BCCD fields: balanced accuracy (cells) | BCCD: confident cells (their accuracy) | "
             "PBC held-out crops: balanced accuracy (cells) | PBC: confident (their accuracy) | seconds BCCD / PBC |",
             "|---|---|---|---|---|---|"]

    def cell(r: dict | None, what: str) -> str:
        if r is None:
            return "not here"
        if what == "ba":
            return f"{r['balanced_accuracy']:.3f} ({r['cells']})"
        acc = "–" if r["confident_accuracy"] is None else f"{r['confident_accuracy']:.3f}"
        return f"{r['confident_cells']} ({acc})"
    for r in rows:
        lines.append(f"| {r['method']} | {cell(r['bccd'], 'ba')} | {cell(r['bccd'], 'conf')} | {cell(r['pbc'], 'ba')} | "
                     f"{cell(r['pbc'], 'conf')} | {r['seconds_bccd']:.0f} / {r['seconds_pbc']:.0f} |")
    conclusion = "BCCD not here: nothing to choose the default by."
    by = {r["method"]: r for r in rows}
    if all(r["bccd"] for r in rows):
        best = max((m for m in by if m != "none"), key=lambda m: by[m]["bccd"]["balanced_accuracy"])
        ba = {m: (by[m]["bccd"]["balanced_accuracy"], by[m]["pbc"]["balanced_accuracy"]) for m in by}
        if best != "reinhard" and ba[best][0] > ba["reinhard"][0] and ba[best][1] >= ba["reinhard"][1] - 0.01:
            conclusion = (f"The numbers support **{best}** as the default: {ba[best][0]:.3f} on BCCD against Reinhard's "
                          f"{ba['reinhard'][0]:.3f}, PBC {ba[best][1]:.3f} against {ba['reinhard'][1]:.3f}.")
        else:
            conclusion = (f"The numbers support keeping **Reinhard** as the default: the best on BCCD is {best} "
                          f"({ba[best][0]:.3f}; Reinhard {ba['reinhard'][0]:.3f}, none {ba['none'][0]:.3f}), and no "
                          "other method beats Reinhard there without costing more than a point on PBC.")
    return (f"Zero-shot, fast estimator, bundled model, ONNX Runtime CPU, {args.threads} thread(s). BCCD trainval: fields "
            "with one typed WBC in which `score` finds exactly one white cell, read as `cytoedge score "
            "--stain-method M` reads them (scale from the red cells, one map per field fitted on it; `none`: "
            f"`--no-stain-normalisation`). PBC: the held-out half of `{args.data}`, {args.per_class} crops per "
            "class, each normalised on its own fit as `cytoedge classify --stain-method M` does (`none`: the "
            "default, colours as scanned). Confident: neither uncertain nor anomalous (the domain alarm is "
            "raised on BCCD, so there they are the cells that would have been labelled confident).\n\n"
            + "\n".join(lines) + "\n\n" + conclusion + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/pbc/calib"))
    ap.add_argument("--bccd", type=Path, default=Path("../shared/data/bccd"))
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=("rescale", "domain", "adapt", "stain"), default=None)
    ap.add_argument("--draws", type=int, default=3, help="random draws of the labelled cells per k (adapt, features)")
    ap.add_argument("--finetune-draws", type=int, default=1, help="draws per k for --method finetune (minutes each)")
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--methods", nargs="+", choices=("features", "finetune"), default=["features", "finetune"],
                    help="adapt: the `cytoedge adapt --method`s measured")
    ap.add_argument("--model", type=Path, default=None, help="bundle to measure (default: the bundled model)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    global MODEL
    MODEL = args.model
    if not args.data.is_dir():
        print(f"{args.data}: not here (real data is not shipped); nothing to measure", file=sys.stderr)
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from results_md import write_section

    sections = (("rescale", "site-rescaled", "Site robustness: crops at other resolutions", rescale_section),
                ("domain", "site-domain", "Site robustness: the out-of-domain alarm", domain_section),
                ("adapt", "site-adapt", "Site robustness: `cytoedge adapt` on BCCD", adapt_section),
                ("stain", "site-stain", "Stain normalisation choices", stain_section))
    for only, key, title, section in sections:
        if args.only and args.only != only:
            continue
        if only == "adapt" and not args.bccd.is_dir():
            print(f"{args.bccd}: not here; adapt not measured", file=sys.stderr)
            continue
        body = section(args)
        print(body)
        if args.write:
            write_section(key, title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
