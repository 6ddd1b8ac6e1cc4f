"""Unseen cell type: AUROC of the anomaly score for a class the model never saw (CytoDiffusion's test).

    python -m cytoedge.training.train_denoiser --run runs/pbc32-no-erythroblast --exclude-class erythroblast
    python -m cytoedge.export.make_bundle --run runs/pbc32-no-erythroblast --out runs/bundle-no-erythroblast
    cytoedge calibrate --data ../shared/data/pbc/calib --model runs/bundle-no-erythroblast --per-class 80
    python benchmarks/bench_unseen_anomaly.py --model runs/bundle-no-erythroblast

Scores the held-out half of pbc/calib: every known-class cell and every cell of the excluded class(es);
reports the AUROC of the calibrated anomaly score for unseen vs known, and for comparison that of
1 − top probability and of the best class's error alone (what the score was before the null class).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.calibration.metrics import auroc
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import crops_to_batch, read_rgb
from cytoedge.runtime.classify_cells import score_cells_fast
from cytoedge.runtime.estimator import estimate
from cytoedge.runtime.labelled_data import list_labelled_files, select_half, stratified_subset

CHUNK = 64


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a bundle trained with --exclude-class")
    p.add_argument("--data", type=Path, default=Path("../shared/data/pbc/calib"))
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    bundle = ModelBundle.load(args.model)
    unseen = bundle.manifest.get("excluded_classes") or []
    if not unseen:
        raise SystemExit(f"{args.model} was trained on every class; train one with --exclude-class first")
    backend = OnnxRuntimeBackend(bundle, threads=args.threads)
    all_classes = bundle.class_names + unseen
    files, labels, _ = list_labelled_files(args.data, all_classes)
    files, labels = select_half(files, labels, "held-out")
    keep = stratified_subset(labels, args.per_class)
    files, labels = [files[i] for i in keep], labels[keep]
    scores, top, best_error, nfe = [], [], [], []
    weights = bundle.calibration.probe_weights
    for s in range(0, len(files), CHUNK):
        batch = crops_to_batch([read_rgb(f) for f in files[s:s + CHUNK]], bundle)
        out = score_cells_fast(batch, bundle, backend)
        scores.append(out.decisions.anomaly_score)
        top.append(out.decisions.probabilities.max(1))
        nfe.append(out.nfe)
        best_error.append(np.nanmean(estimate(batch, bundle, backend).leader_errors / weights, axis=1))
    scores, top, best_error, nfe = map(np.concatenate, (scores, top, best_error, nfe))
    is_unseen = labels >= len(bundle.class_names)
    flagged = scores > bundle.calibration.thresholds.anomaly
    result = {"unseen_classes": unseen, "cells_known": int((~is_unseen).sum()), "cells_unseen": int(is_unseen.sum()),
              "anomaly_kind": bundle.calibration.anomaly_normalisation.kind,
              "auroc_anomaly_score": auroc(scores, is_unseen), "auroc_one_minus_top_probability": auroc(1 - top, is_unseen),
              "auroc_best_class_error": auroc(best_error, is_unseen), "nfe_mean": float(nfe.mean()),
              "flag_rate_unseen": float(flagged[is_unseen].mean()), "flag_rate_known": float(flagged[~is_unseen].mean())}
    print(json.dumps(result, indent=2))
    prov = bundle.manifest.get("provenance", {})
    body = (f"Model `{bundle.name}` trained without {unseen} (bundle {bundle.sha256[:12]}; {prov.get('steps')} steps, "
            f"{prov.get('train_minutes')} min, null-class share {prov.get('null_class_prob', 0.0)}); held-out half of "
            f"`{args.data}`: {result['cells_known']} known-class cells, {result['cells_unseen']} unseen.\n\n"
            "| measure | value | target |\n|---|---|---|\n"
            f"| AUROC, anomaly score (`{result['anomaly_kind']}`) | {result['auroc_anomaly_score']:.3f} | ≥ 0.95 |\n"
            f"| AUROC, 1 − top probability | {result['auroc_one_minus_top_probability']:.3f} | |\n"
            f"| AUROC, best class's error alone | {result['auroc_best_class_error']:.3f} | |\n"
            f"| NFE per cell (mean) | {result['nfe_mean']:.1f} | |\n"
            f"| anomalous flag rate: unseen / known | {result['flag_rate_unseen']:.3f} / {result['flag_rate_known']:.3f} | |\n")
    write_section("unseen-anomaly", "Unseen cell type: anomaly AUROC (issue 3)", body)


if __name__ == "__main__":
    main()
