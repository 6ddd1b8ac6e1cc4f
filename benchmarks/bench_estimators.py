"""Reference protocol vs the fast estimator on the same held-out PBC cells and the same model.

    python benchmarks/bench_estimators.py --data ../shared/data/pbc/calib --reference-per-class 25

Reports: balanced accuracy / per-class recall / NFE / cells/s of both estimators on the same
stratified subset of the held-out half; the fast estimator's full metrics on the whole held-out
half; accuracy vs NFE (probe count, elimination margins); calibration before/after the fitted
temperature; a reliability diagram and a risk–coverage plot (benchmarks/figures/).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from results_md import write_section

from cytoedge.calibration import metrics as m
from cytoedge.calibration.fit import offline_race
from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import crops_to_batch, read_rgb
from cytoedge.runtime.classify_cells import score_cells_fast
from cytoedge.runtime.commands.evaluate import evaluate_arrays
from cytoedge.runtime.decisions import concat_decisions
from cytoedge.runtime.estimator import RaceSettings, noise_bank, probes_from_calibration
from cytoedge.runtime.labelled_data import list_labelled_files, select_half, stratified_subset
from cytoedge.runtime.probe_errors import all_class_errors
from cytoedge.runtime.reference_estimator import ReferenceSettings, classify_reference

FIGURES = Path(__file__).resolve().parent / "figures"
CHUNK = 64


def load(files, bundle):
    return crops_to_batch([read_rgb(f) for f in files], bundle)


def run_fast(files, bundle, backend):
    parts, nfe, temps, t0 = [], [], [], time.perf_counter()
    for s in range(0, len(files), CHUNK):
        out = score_cells_fast(load(files[s:s + CHUNK], bundle), bundle, backend)
        parts.append(out.decisions)
        nfe.append(out.nfe)
        temps.append(out.temperature)
    return concat_decisions(parts), np.concatenate(nfe), np.concatenate(temps), time.perf_counter() - t0


def run_reference(files, bundle, backend, settings):
    preds, nfe, t0 = [], [], time.perf_counter()
    for s in range(0, len(files), CHUNK):
        res = classify_reference(load(files[s:s + CHUNK], bundle), bundle, backend, settings)
        preds.append(res.class_id)
        nfe.append(res.nfe)
    return np.concatenate(preds), np.concatenate(nfe), time.perf_counter() - t0


def nfe_curve(files, y, bundle, backend) -> list[dict]:
    """Balanced accuracy vs NFE from the chosen probes' full error matrix, simulated offline."""
    probes, settings = probes_from_calibration(bundle)
    noise = noise_bank(bundle)
    E = np.concatenate([all_class_errors(load(files[s:s + CHUNK], bundle), bundle, backend, probes, noise)
                        for s in range(0, len(files), CHUNK)])
    k, rows = len(bundle.class_names), []
    null = E[:, k] if E.shape[1] > k else None  # measured beside each probe, as the live race does
    for n_probes in range(1, len(probes) + 1):
        for scale in (0.5, 1.0, 2.0, np.inf):
            w = settings.weights[:n_probes]
            margins = settings.margins[:n_probes] * scale if np.isfinite(scale) else np.full(n_probes, np.inf)
            race = offline_race(E[:, :k, :n_probes], RaceSettings(w, margins),
                                None if null is None else null[:, :n_probes])
            pred = race.gaps.argmin(1)
            rows.append({"probes": n_probes, "margin_scale": "none" if scale == np.inf else scale,
                         "nfe_mean": float(race.nfe.mean()), "balanced_accuracy": m.balanced_accuracy(y, pred, k)})
    return rows


def plots(decisions, y, temperature_note: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(exist_ok=True)
    table = m.reliability_table(decisions.probabilities, y, 15)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    mids = [(r["lo"] + r["hi"]) / 2 for r in table if r["count"]]
    acc = [r["accuracy"] for r in table if r["count"]]
    ax.bar(mids, acc, width=1 / 15, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="confidence (top-class probability)", ylabel="accuracy", title=f"Reliability ({temperature_note})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(FIGURES / "reliability.png", dpi=100)
    rc = m.risk_coverage(decisions.probabilities, y, 40)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([r["coverage"] for r in rc], [r["risk"] for r in rc], "o-", ms=3)
    ax.set(xlabel="coverage (fraction of cells kept)", ylabel="risk (error rate among kept)", title="Risk–coverage")
    fig.tight_layout()
    fig.savefig(FIGURES / "risk_coverage.png", dpi=100)
    plt.close("all")
    return ["figures/reliability.png", "figures/risk_coverage.png"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/pbc/calib"))
    p.add_argument("--model", type=Path, default=default_bundle_path())
    p.add_argument("--reference-per-class", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "estimators.json")
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data} not found: this benchmark needs the labelled PBC cells")
    bundle = ModelBundle.load(args.model)
    backend = OnnxRuntimeBackend(bundle, threads=args.threads)
    names = bundle.class_names
    files, labels, _ = list_labelled_files(args.data, names)
    files, labels = select_half(files, labels, "held-out")

    dec, nfe, temperature, secs = run_fast(files, bundle, backend)
    full = evaluate_arrays(labels, dec.class_id, nfe, secs, names, bundle.abnormal_classes, dec,
                           bundle.calibration.settings["abnormal_sensitivity"])
    best = full["abnormal_probability_at_target_sensitivity"]
    false_pos = ", ".join(f"{n} {v}/{int((labels == names.index(n)).sum())}"
                          for n, v in sorted(best["false_positives_by_class"].items(), key=lambda kv: -kv[1]) if v)
    raw_p = np.exp(-(-np.log(np.clip(dec.probabilities, 1e-300, 1)) * temperature[:, None]))
    raw_p /= raw_p.sum(1, keepdims=True)
    before = {"ece_15": m.expected_calibration_error(raw_p, labels), "nll": m.nll(raw_p, labels)}
    figures = plots(dec, labels, "T by depth " + ", ".join(f"{t:.3g}" for t in bundle.calibration.temperature_by_depth
                                                            or [bundle.calibration.temperature]))

    sub = stratified_subset(labels, args.reference_per_class, seed=1)
    sub_files, y = [files[i] for i in sub], labels[sub]
    ref_pred, ref_nfe, ref_secs = run_reference(sub_files, bundle, backend, ReferenceSettings())
    fast_sub = evaluate_arrays(y, dec.class_id[sub], nfe[sub], secs * len(sub) / len(files), names,
                               bundle.abnormal_classes)
    ref = evaluate_arrays(y, ref_pred, ref_nfe, ref_secs, names, bundle.abnormal_classes)
    curve = nfe_curve(sub_files, y, bundle, backend)
    args.json.write_text(json.dumps({"fast_held_out": full, "calibration_before": before, "reference_subset": ref,
                                     "fast_subset": fast_sub, "nfe_curve": curve}, indent=2))

    def row(label, r):
        return (f"| {label} | {r['cells']} | {r['balanced_accuracy']:.3f} | {r['accuracy']:.3f} | "
                f"{r['nfe_mean']:.1f} | {r['nfe_p95']:.0f} | {r['cells_per_second']:.2f} |")

    recall = "\n".join(f"| {c} | {ref['per_class_recall'][c]:.2f} | {fast_sub['per_class_recall'][c]:.2f} | "
                       f"{full['per_class_recall'][c]:.2f} |" for c in names)
    curve_rows = "\n".join(f"| {r['probes']} | {r['margin_scale']} | {r['nfe_mean']:.1f} | {r['balanced_accuracy']:.3f} |"
                           for r in curve)
    flag = full["abnormal_review_flag"]
    body = f"""Model `{bundle.name}` (bundle {bundle.sha256[:12]}), ONNX Runtime CPU, {args.threads} threads.
Held-out half of `{args.data}` ({len(files)} cells; calibration was fitted on the other half). The reference
protocol (N = 2000, paired t-test p < 2e-3 from trial 20, every 5) runs on a stratified subset of
{args.reference_per_class} cells per class ({len(sub)} cells); the fast estimator on the same subset and on the whole half.

| estimator | cells | balanced acc. | accuracy | NFE mean | NFE p95 | cells/s |
|---|---|---|---|---|---|---|
{row("reference (subset)", ref)}
{row("fast (same subset)", fast_sub)}
{row("fast (whole held-out half)", full)}

NFE ratio reference / fast on the same cells: **{ref['nfe_mean'] / fast_sub['nfe_mean']:.1f}×**;
balanced-accuracy difference (fast − reference, same cells): **{fast_sub['balanced_accuracy'] - ref['balanced_accuracy']:+.3f}**.

Per-class recall:

| class | reference (subset) | fast (subset) | fast (held-out half) |
|---|---|---|---|
{recall}

Fast estimator on the held-out half — calibration and flags:

| metric | value | target |
|---|---|---|
| ECE (15 bins), after temperature | {full['ece_15']:.4f} | ≤ 0.03 |
| ECE (15 bins), before (T = 1) | {before['ece_15']:.4f} | |
| NLL after / before | {full['nll']:.3f} / {before['nll']:.3f} | |
| Brier | {full['brier']:.4f} | |
| conformal coverage (nominal {bundle.calibration.settings['coverage']}) | {full['conformal_coverage']:.3f} | within 0.02 |
| conformal mean set size | {full['conformal_mean_set_size']:.2f} | |
| abstention rate / accuracy when not abstaining | {full['abstention_rate']:.3f} / {full['accuracy_when_not_abstaining']:.3f} | |
| abnormal review flag (abnormal ∪ uncertain ∪ anomalous): sensitivity / specificity | {flag['sensitivity']:.3f} / {flag['specificity']:.3f} | ≥ 0.95 / ≥ 0.96 |
| abnormal flag alone: sensitivity / specificity | {full['abnormal_flag_alone']['sensitivity']:.3f} / {full['abnormal_flag_alone']['specificity']:.3f} | |
| AUROC of P(abnormal) | {full['abnormal_probability_auroc']:.3f} | |
| best any threshold on P(abnormal) does at sensitivity {best['target_sensitivity']}: sensitivity / specificity (what this model's P(abnormal) allows) | {best['sensitivity']:.3f} / {best['specificity']:.3f} | |
| normal cells that threshold flags, by class | {false_pos} | |

Accuracy vs NFE of the fast estimator (same subset; first k calibrated probes; elimination margins scaled):

| probes | margin scale | NFE mean | balanced acc. |
|---|---|---|---|
{curve_rows}

Figures: {", ".join(f"[{f}]({f})" for f in figures)}. Raw numbers: `benchmarks/{args.json.name}`.
"""
    write_section("estimators", "Estimators: reference protocol vs fast estimator (issues 2, 3)", body)
    print(body)


if __name__ == "__main__":
    main()
