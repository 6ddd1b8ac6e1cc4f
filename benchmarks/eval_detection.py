"""Detection accuracy on real fields: BCCD white cells (recall/precision at IoU ≥ 0.5) and PBC crops
(is the centred cell found: a detection whose box holds the crop centre or whose centre is within
3 µm; for platelet crops a platelet or a white-cell detection, as clumps pass for small nuclei). Needs ../shared/data; appends nothing unless --write is given.

    python benchmarks/eval_detection.py [--data ../shared/data] [--um-per-px auto|0.0721] [--stain] [--write]

``--write`` replaces the "Whole-smear scoring: detection" section of RESULTS.md (one block per
--um-per-px mode, so the auto-scale and fixed-scale runs are both kept).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from cytoedge.runtime.cells import read_rgb
from cytoedge.runtime.detection import detect_cells
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM, estimate_um_per_px

CENTRE_TOLERANCE_UM = 3.0  # a PBC crop's cell counts as found if a detection is centred this close
BCCD_RBC_BOX_PX = 104.0  # median box side of fully visible BCCD red cells (from the annotations)


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def voc_boxes(xml: Path, name: str) -> list[tuple[float, float, float, float]]:
    out = []
    for obj in ET.parse(xml).findall("object"):
        if obj.find("name").text == name:
            b = obj.find("bndbox")
            out.append(tuple(float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")))
    return out


def greedy_match(pred, truth, thr=0.5) -> int:
    pairs = sorted(((iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)), reverse=True)
    used_p, used_t, hits = set(), set(), 0
    for v, i, j in pairs:
        if v < thr:
            break
        if i in used_p or j in used_t:
            continue
        used_p.add(i)
        used_t.add(j)
        hits += 1
    return hits


def eval_bccd(root: Path, scale_mode: str, limit: int | None) -> dict:
    xmls = sorted((root / "bccd" / "annotations").glob("*.xml"))[:limit]
    tp = n_pred = n_true = 0
    scale_errors = []
    for xml in xmls:
        img = root / "bccd" / "images" / (xml.stem + ".jpg")
        if not img.is_file():
            continue
        rgb = read_rgb(img)
        fixed = RED_CELL_DIAMETER_UM / BCCD_RBC_BOX_PX
        if scale_mode == "auto":
            try:
                um = estimate_um_per_px(rgb, str(img)).um_per_px
            except CytoedgeError:
                um = fixed
            scale_errors.append(um / fixed - 1)
        else:
            um = float(scale_mode)
        det = detect_cells(rgb, um)
        pred = [d.bbox for d in det.white]
        truth = voc_boxes(xml, "WBC")
        tp += greedy_match(pred, truth)
        n_pred += len(pred)
        n_true += len(truth)
    out = {"fields": len(xmls), "wbc_true": n_true, "wbc_pred": n_pred, "tp": tp,
           "recall": tp / max(n_true, 1), "precision": tp / max(n_pred, 1)}
    if scale_errors:
        out["scale_rel_error_median"] = float(np.median(scale_errors))
    return out


def eval_pbc(root: Path, per_class: int) -> dict:
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.cells import default_crop_um_per_px

    um = default_crop_um_per_px(ModelBundle.load(default_bundle_path()))
    found = total = 0
    by_class = {}
    for cls_dir in sorted((root / "pbc" / "calib").iterdir()):
        files = sorted(cls_dir.glob("*.jpg"))[:per_class]
        hits = 0
        for f in files:
            rgb = read_rgb(f)
            det = detect_cells(rgb, um)
            cx, cy = (rgb.shape[1] - 1) / 2, (rgb.shape[0] - 1) / 2
            # A platelet clump can pass for a small nucleus: it is then scored, and the model has a platelet class.
            cands = det.platelets + det.white if cls_dir.name == "platelet" else det.white
            hits += any((d.bbox[0] <= cx <= d.bbox[2] and d.bbox[1] <= cy <= d.bbox[3])
                        or np.hypot(d.cx - cx, d.cy - cy) * um <= CENTRE_TOLERANCE_UM for d in cands)
        by_class[cls_dir.name] = hits / max(len(files), 1)
        found += hits
        total += len(files)
    return {"crops": total, "centre_found": found / max(total, 1), "by_class": by_class}


def eval_stain(root: Path, um_per_px: float, limit: int | None, threads: int) -> dict:
    """Agreement of the predicted type of each field's white cell with bccd/wbc_subtypes.csv,
    scored with and without Reinhard normalisation (fields with one labelled type and one WBC found)."""
    import csv

    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
    from cytoedge.runtime.sources import open_source

    labels = {}
    with open(root / "bccd" / "wbc_subtypes.csv") as f:
        for row in csv.DictReader(f):
            kinds = [k.strip().lower() for k in row["wbc_type"].split(",") if k.strip()]
            if len(kinds) == 1:
                labels[row["image"]] = kinds[0]
    names = sorted(labels)[:limit]
    bundle = ModelBundle.load(default_bundle_path())
    backend = OnnxRuntimeBackend(bundle, threads=threads)
    out = {}
    for mode in ("as_scanned", "slide", "cell"):
        opts = ScoringOptions(um_per_px=um_per_px, stain_normalise=mode != "as_scanned",
                              stain_context="slide" if mode == "as_scanned" else mode, heatmaps=False)
        scorer = SlideScorer(bundle, backend, "fast", opts)
        agree = total = 0
        confusion: dict[str, dict[str, int]] = {}
        for name in names:
            path = root / "bccd" / "images" / f"{name}.jpg"
            if not path.is_file():
                continue
            cells = list(scorer.score_source(open_source(path, um_per_px)))
            if len(cells) != 1:
                continue
            pred, true = cells[0]["class"], labels[name]
            confusion.setdefault(true, {}).setdefault(pred, 0)
            confusion[true][pred] += 1
            agree += pred == true
            total += 1
        out[mode] = {"fields": total, "agreement": agree / max(total, 1), "confusion": confusion}
    return out


def eval_stain_pbc(root: Path, threads: int, pooled_crops: int = 40) -> dict:
    """Balanced accuracy on PBC's held-out half (the model's own stain) as scanned, through one Reinhard
    map pooled over ``pooled_crops`` crops (what a per-slide map is on a slide of this stain), and
    through a map fitted on each crop's own field (what the per-cell map is)."""
    from cytoedge.calibration.metrics import balanced_accuracy
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.cells import crops_to_batch
    from cytoedge.runtime.classify_cells import score_cells_fast
    from cytoedge.runtime.labelled_data import list_labelled_files, select_half
    from cytoedge.runtime.stain import LabStats, lab_stats, reference_stats, reinhard

    bundle = ModelBundle.load(default_bundle_path())
    backend, ref = OnnxRuntimeBackend(bundle, threads=threads), reference_stats(bundle)
    files, labels, _ = list_labelled_files(root / "pbc" / "calib", bundle.class_names)
    files, labels = select_half(files, labels, "held-out")
    sample = [lab_stats(read_rgb(files[i])) for i in np.random.default_rng(0).choice(len(files), pooled_crops, False)]
    pooled = LabStats(tuple(np.mean([s.mean for s in sample], 0)),
                      tuple(np.sqrt(np.mean([np.square(s.std) for s in sample], 0))))
    maps = {"as_scanned": lambda im: im, "pooled": lambda im: reinhard(im, pooled, ref),
            "per_crop": lambda im: reinhard(im, lab_stats(im), ref)}
    out = {}
    for mode, colour in maps.items():
        pred = np.concatenate([score_cells_fast(crops_to_batch([colour(read_rgb(f)) for f in files[s:s + 64]], bundle),
                                                bundle, backend).decisions.class_id
                               for s in range(0, len(files), 64)])
        out[mode] = balanced_accuracy(labels, pred, len(bundle.class_names))
    return {"cells": len(files), **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--um-per-px", default="auto", help="'auto' (red-cell estimate) or a number for BCCD")
    ap.add_argument("--limit", type=int, default=None, help="first N BCCD fields only")
    ap.add_argument("--pbc-per-class", type=int, default=40)
    ap.add_argument("--write", action="store_true", help="append the numbers to benchmarks/RESULTS.md")
    ap.add_argument("--stain", action="store_true",
                    help="also classify BCCD white cells and PBC's held-out crops (fast estimator) with and "
                         "without stain normalisation, per slide and per cell")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not (args.data / "bccd").is_dir():
        print(f"skipped: {args.data}/bccd not found", file=sys.stderr)
        return 0
    t0 = time.time()
    bccd = eval_bccd(args.data, args.um_per_px, args.limit)
    pbc = eval_pbc(args.data, args.pbc_per_class)
    line = (f"- detection, scale {args.um_per_px}: BCCD {bccd['fields']} fields, "
            f"WBC recall {bccd['recall']:.3f} precision {bccd['precision']:.3f} at IoU ≥ 0.5 "
            f"({bccd['tp']}/{bccd['wbc_true']} true, {bccd['wbc_pred']} predicted)"
            + (f", scale estimate median rel. error {bccd['scale_rel_error_median']:+.2f}" if "scale_rel_error_median" in bccd else "")
            + f"; PBC calib {pbc['crops']} crops, centred cell found {pbc['centre_found']:.3f} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in pbc['by_class'].items())}); {time.time() - t0:.0f} s")
    if args.stain:
        um = float(args.um_per_px) if args.um_per_px != "auto" else RED_CELL_DIAMETER_UM / BCCD_RBC_BOX_PX
        st = eval_stain(args.data, um, args.limit, args.threads)
        pbc_stain = eval_stain_pbc(args.data, args.threads)
        line += "\n" + (f"- stain check (`--stain`, {um:.4f} µm/px, fast estimator): WBC type agreement with "
                         f"wbc_subtypes.csv on {st['cell']['fields']} single-WBC fields: as scanned "
                         f"{st['as_scanned']['agreement']:.3f}, Reinhard per slide (default) "
                         f"{st['slide']['agreement']:.3f}, Reinhard per cell {st['cell']['agreement']:.3f}; "
                         f"predictions (per slide) per true type: {json.dumps(st['slide']['confusion'])}. "
                         f"PBC held-out half ({pbc_stain['cells']} crops, the model's own stain), balanced accuracy: "
                         f"as scanned {pbc_stain['as_scanned']:.3f}, one map pooled over 40 crops (= per slide) "
                         f"{pbc_stain['pooled']:.3f}, a map per crop (= per cell) {pbc_stain['per_crop']:.3f}")
    print(line)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_md import write_section

        mode = "auto" if args.um_per_px == "auto" else "fixed"
        write_section(f"whole-smear-detection-{mode}", f"Whole-smear scoring: detection ({mode} scale)",
                      "BCCD scale from its annotations: median red-cell box 104 px = 7.5 µm → 0.0721 µm/px; "
                      "'auto' estimates it per field from red cells.\n\n" + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
