"""``cytoedge evaluate --data DIR``: accuracy, calibration and flag quality on labelled cells.

By default it reports on the held-out half of DIR (the half ``cytoedge calibrate`` does not fit on).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import (CROP_SCALE_HELP, add_model_arguments, add_stain_argument,
                                              add_um_per_px_argument, crop_stain_normaliser, load_bundle_and_backend,
                                              progress_bar)
from cytoedge.runtime.crop_scale import crop_scales_or_raise

CHUNK = 64


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure accuracy and calibration on labelled cells", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="labelled folder DIR/<class>/<image>")
    add_model_arguments(p)
    p.add_argument("--half", choices=("fit", "held-out", "all"), default="held-out")
    p.add_argument("--per-class", type=int, default=None, help="at most this many cells per class")
    add_um_per_px_argument(p, CROP_SCALE_HELP)
    add_stain_argument(p)
    p.add_argument("--out", type=Path, default=None, help="write the metrics JSON here")
    p.set_defaults(func=run)


def evaluate_arrays(y: np.ndarray, pred: np.ndarray, nfe: np.ndarray, seconds: float, class_names: list[str],
                    abnormal_classes: list[str], decisions=None, abnormal_sensitivity: float | None = None) -> dict:
    """Every metric the issue asks for, from labels and the estimator's outputs (pure).

    With ``abnormal_sensitivity`` (the calibration's target) it also reports the best specificity any
    threshold on P(abnormal) reaches at that sensitivity, alone and as the review flag (with the uncertain
    and anomalous cells, which the flag always holds), and which normal classes it flags: whether a missed
    flag target is the operating point's fault or the model's."""
    from cytoedge.calibration import metrics as m

    k = len(class_names)
    out = {
        "cells": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": m.balanced_accuracy(y, pred, k),
        "per_class_recall": dict(zip(class_names, map(float, m.per_class_recall(y, pred, k)))),
        "confusion_matrix": {"rows_true_cols_pred": class_names, "counts": m.confusion_matrix(y, pred, k).tolist()},
        "nfe_mean": float(nfe.mean()), "nfe_p95": float(np.percentile(nfe, 95)),
        "cells_per_second": float(len(y) / seconds) if seconds > 0 else None,
    }
    if decisions is None:
        return out
    d = decisions
    abnormal_truth = np.array([class_names[c] in abnormal_classes for c in y])
    review = d.abnormal | d.uncertain | d.anomalous
    sens, spec = m.sensitivity_specificity(review, abnormal_truth)
    sens_pred, spec_pred = m.sensitivity_specificity(d.abnormal, abnormal_truth)
    out.update({
        "ece_15": m.expected_calibration_error(d.probabilities, y, 15),
        "brier": m.brier_score(d.probabilities, y),
        "nll": m.nll(d.probabilities, y),
        "reliability": m.reliability_table(d.probabilities, y, 15),
        "risk_coverage": m.risk_coverage(d.probabilities, y),
        "conformal_coverage": float(d.prediction_sets[np.arange(len(y)), y].mean()),
        "conformal_mean_set_size": float(d.prediction_sets.sum(1).mean()),
        "abstention_rate": float(d.uncertain.mean()),
        "accuracy_when_not_abstaining": float((pred == y)[~d.uncertain].mean()) if (~d.uncertain).any() else None,
        "anomalous_rate": float(d.anomalous.mean()),
        "abnormal_review_flag": {"definition": "abnormal | uncertain | anomalous",
                                 "sensitivity": sens, "specificity": spec},
        "abnormal_flag_alone": {"sensitivity": sens_pred, "specificity": spec_pred},
        "abnormal_probability_auroc": m.auroc(d.abnormal_probability, abnormal_truth),
    })
    if abnormal_sensitivity is not None:
        best = m.specificity_at_sensitivity(d.abnormal_probability, abnormal_truth, abnormal_sensitivity)
        flagged = (d.abnormal_probability >= best["threshold"]) & ~abnormal_truth if best["threshold"] is not None \
            else np.zeros(len(y), bool)
        best["false_positives_by_class"] = {n: int(flagged[y == c].sum()) for c, n in enumerate(class_names)
                                            if n not in abnormal_classes}
        out["abnormal_probability_at_target_sensitivity"] = best
        always = d.uncertain | d.anomalous
        out["review_flag_at_target_sensitivity"] = m.specificity_at_sensitivity(
            np.where(always, np.inf, d.abnormal_probability), abnormal_truth, abnormal_sensitivity)
    return out


def confidence_report(labels: np.ndarray, decisions, names: list[str], domain: dict | None) -> dict:
    """The out-of-domain alarm over the evaluated cells, and how often the cells labelled
    "confident" (neither uncertain nor anomalous, and no alarm raised) are right."""
    from cytoedge.runtime.domain_alarm import run_alarm

    alarm = run_alarm(decisions.anomaly_score, decisions.typicality, [names[k] for k in decisions.class_id], domain)
    confident = ~(decisions.uncertain | decisions.anomalous) & (not alarm["raised"])
    right = decisions.class_id == labels
    return {"domain_alarm": alarm, "confident_cells": int(confident.sum()),
            "confident_accuracy": round(float(right[confident].mean()), 4) if confident.any() else None,
            "atypical_cells": int(decisions.atypical.sum())}


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.cells import crops_to_batch, read_crop
    from cytoedge.runtime.classify_cells import score_cells_fast
    from cytoedge.runtime.decisions import concat_decisions
    from cytoedge.runtime.detection import holds_a_cell
    from cytoedge.runtime.labelled_data import labelled_subset
    from cytoedge.runtime.reference_estimator import classify_reference

    bundle, backend, estimator = load_bundle_and_backend(args)
    normaliser = crop_stain_normaliser(args, bundle)
    files, labels = labelled_subset(args.data, bundle.class_names, args.half, args.per_class)
    scales = crop_scales_or_raise(files, bundle, args.um_per_px)
    preds, nfes, parts = [], [], []
    start = time.perf_counter()
    with progress_bar(len(files), "cells") as bar:
        for s in range(0, len(files), CHUNK):
            crops = [read_crop(f) for f in files[s:s + CHUNK]]
            if normaliser is not None:
                crops = [normaliser.normalise(rgb) for rgb in crops]
            batch = crops_to_batch(crops, bundle, [scales.scale(str(f)).um_per_px for f in files[s:s + CHUNK]],
                                   [str(f) for f in files[s:s + CHUNK]])
            if estimator == "fast":
                outcome = score_cells_fast(batch, bundle, backend)
                empty = np.array([not holds_a_cell(rgb, bundle.cell_type) for rgb in crops])  # as classify marks them
                outcome.decisions.anomalous[empty] = True
                preds.append(outcome.decisions.class_id)
                nfes.append(outcome.nfe)
                parts.append(outcome.decisions)
            else:
                res = classify_reference(batch, bundle, backend)
                preds.append(res.class_id)
                nfes.append(res.nfe)
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    decisions = concat_decisions(parts) if parts else None
    report = evaluate_arrays(labels, np.concatenate(preds), np.concatenate(nfes), seconds, bundle.class_names,
                             bundle.abnormal_classes, decisions,
                             bundle.calibration.settings.get("abnormal_sensitivity") if bundle.calibration else None)
    if decisions is not None:
        report.update(confidence_report(labels, decisions, bundle.class_names, bundle.domain))
    report = {"model": bundle.name, "bundle_sha256": bundle.sha256, "backend": backend.name, "estimator": estimator,
              "data": str(args.data), "half": args.half, "per_class": args.per_class,
              "stain_normalisation": f"{normaliser.method}-per-crop" if normaliser is not None else None,
              "scale": scales.summary(), **report}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    summary = {k: report[k] for k in ("cells", "accuracy", "balanced_accuracy", "nfe_mean", "cells_per_second")}
    for key in ("ece_15", "conformal_coverage", "conformal_mean_set_size", "abnormal_review_flag",
                "abnormal_probability_at_target_sensitivity", "confident_cells", "confident_accuracy",
                "domain_alarm"):
        if key in report:
            summary[key] = report[key]
    print(json.dumps(summary, indent=2))
    return 0

