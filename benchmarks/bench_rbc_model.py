"""Red-cell morphology bundle on the held-out Chula RBC-12 fields: per-class recall and precision,
balanced accuracy, the confusion matrix, schistocyte recall and specificity, cells per second.

  python benchmarks/bench_rbc_model.py [--data ../shared/data/chula_rbc12] [--model models/rbc32-ddpm]
      [--model OTHER_BUNDLE ...] [--half held-out|measure] [--threads 2] [--write]

The fields are split by content hash (training/rbc_data.held_out); the bundle never trained on this half.
``--half measure`` leaves out its calibration third (training/rbc_data.field_part), for a bundle
calibrated on those fields.
Each labelled cell is cut as the training crops were (training/rbc_data.cut_crops, at Chula's one
dataset scale) and classified by the fast estimator as `cytoedge classify` does. Balanced accuracy is
the mean recall over the classes with at least MIN_CELLS held-out cells. Schistocyte flagging is read two
ways: the predicted class (argmax), and the best any threshold on P(schistocyte) does at recall 0.90.
Further ``--model`` bundles (e.g. the class-balancing ablation) get the summary row only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from cytoedge.calibration import metrics as m
from cytoedge.runtime.backends.select import create_backend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import crops_to_batch, read_rgb
from cytoedge.runtime.classify_cells import score_cells_fast
from cytoedge.runtime.decisions import concat_decisions
from cytoedge.training.rbc_data import CHULA_CLASSES, CHULA_UM_PER_PX, CROP_SOURCE_PX, cut_crops, field_files, read_labels

MIN_CELLS = 20
TARGET_RECALL = 0.90
CHUNK = 256


def labelled_cells(data: Path, half: str, max_fields: int | None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Every labelled cell of ``half``'s fields (the first ``max_fields``) as a crop, its Chula class id, and
    the index of its field."""
    crops, labels, field_of = [], [], []
    fields = field_files(data, half)[:max_fields]
    for f, field in enumerate(fields):
        cells = read_labels(data, field)
        if cells:
            crops += cut_crops(read_rgb(field), [(x, y) for x, y, _ in cells], CROP_SOURCE_PX)
            labels += [k for _, _, k in cells]
            field_of += [f] * len(cells)
    return crops, np.array(labels, np.int64), np.array(field_of, np.int64)


def _reading(calls: np.ndarray, probabilities: np.ndarray, names: list[str], grading: dict) -> dict:
    """The product's reading (runtime/rbc_grading.red_cell_reading) of cells with these calls."""
    from cytoedge.runtime.rbc_grading import red_cell_reading

    counts = {c: int(k) for c, k in zip(names, np.bincount(calls, minlength=len(names)))}
    return red_cell_reading(counts, grading, probabilities)


def grading_agreement(y: np.ndarray, d, field_of: np.ndarray, bundle: ModelBundle, mode: str) -> dict:
    """Per (field, ICSH feature): the grade from the model's reading of a field's labelled cells against the
    grade from their labels (Chula labels a subset of each field's cells: both read the same cells).
    ``mode``: "corrected" (the shares corrected for the model's confusions, as a slide is read), "called"
    (classify and count) or "expected" (the sum of each class's calibrated probability)."""
    from cytoedge.runtime.rbc_grading import grade

    names, grading = bundle.class_names, bundle.grading
    pairs = agree = 0
    by_feature: dict[str, list[int]] = {}
    for f in np.unique(field_of):
        sel = field_of == f
        n = int(sel.sum())
        if mode != "expected":
            read = _reading(d.class_id[sel], d.probabilities[sel], names,
                            grading if mode == "corrected" else {**grading, "share_estimate": None})
        for cls, spec in grading["features"].items():
            c = names.index(cls)
            truth = grade(100 * (y[sel] == c).sum() / n, int((y[sel] == c).sum()), spec["grade_starts_percent"])
            if mode == "expected":
                k = float(d.probabilities[sel, c].sum())
                reading = grade(100 * k / n, int(np.ceil(k)), spec["grade_starts_percent"])
            else:
                reading = read["grades"][spec["feature"]]["grade"]
            pairs += 1
            agree += truth == reading
            by_feature.setdefault(spec["feature"], []).append(int(truth == reading))
    return {"pairs": pairs, "agreement": agree / pairs if pairs else float("nan"),
            "by_feature": {k: float(np.mean(v)) for k, v in by_feature.items()}}


# Slides a lab meets, as class shares (the rest normal): the schistocyte urgency must fire on the first
# kind above 1 % and stay quiet on anaemias whose cells the model sometimes calls schistocytes.
SLIDES = [({}, "normal"), ({"schistocyte": 0.005}, "0.5 % schistocytes"), ({"schistocyte": 0.01}, "1 % schistocytes"),
          ({"schistocyte": 0.02}, "2 % schistocytes"), ({"schistocyte": 0.03}, "3 % schistocytes"),
          ({"schistocyte": 0.05}, "5 % schistocytes"), ({"spherocyte": 0.3}, "30 % spherocytes"),
          ({"microcyte": 0.3}, "30 % microcytes"), ({"microcyte": 0.3, "hypochromia": 0.2}, "30 % microcytes, 20 % hypochromic"),
          ({"teardrop": 0.1}, "10 % teardrops"), ({"target_cell": 0.3}, "30 % target cells"),
          ({"spherocyte": 0.3, "schistocyte": 0.02}, "30 % spherocytes + 2 % schistocytes"),
          ({"microcyte": 0.3, "schistocyte": 0.02}, "30 % microcytes + 2 % schistocytes")]


def urgency_on_resampled_slides(y: np.ndarray, d, bundle: ModelBundle, slides: int = 50, cells: int = 1000) -> str:
    """Each SLIDES composition as ``slides`` slides of ``cells`` held-out cells drawn (with replacement)
    from its classes, read from called counts and corrected: how often each is urgent, its schistocyte share."""
    names, grading = bundle.class_names, bundle.grading
    urgent_class, limit = grading["urgent"]["class"], grading["urgent"]["above_percent"]
    estimate = grading["share_estimate"]
    quick = {**grading, "share_estimate": {**estimate, "interval": {**estimate["interval"], "bootstrap_resamples": 10}}}
    reads = {"called": {**grading, "share_estimate": None}, "corrected": quick}  # the interval decides nothing
    rng = np.random.default_rng(0)
    pools = {c: np.flatnonzero(y == names.index(c)) for c in names}
    rows = []
    for shares, label in SLIDES:
        mix = {**shares, "normal": 1 - sum(shares.values())}
        if missing := [c for c in mix if not len(pools[c])]:  # a quick check on a few fields
            rows.append(f"| {label} | no held-out {', '.join(missing)} cells in these fields |")
            continue
        out: dict[str, list] = {"called": [], "corrected": []}
        for _ in range(slides):
            ids = np.concatenate([rng.choice(pools[c], int(round(f * cells))) for c, f in mix.items()])
            for mode, g in reads.items():
                r = _reading(d.class_id[ids], d.probabilities[ids], names, g)
                share = r["by_class"][urgent_class]
                out[mode].append((r["triage"]["level"], share.get("adjusted_percent", share["percent"])))
        row = [label, f"{100 * shares.get(urgent_class, 0):g}"]
        for mode in ("called", "corrected"):
            row += [f"{np.mean([lv == 'urgent' for lv, _ in out[mode]]):.0%}", f"{np.mean([p for _, p in out[mode]]):.2f}"]
        row.append(f"{np.mean([lv != 'routine' for lv, _ in out['corrected']]):.0%}")
        rows.append("| " + " | ".join(row) + " |")
    return (f"\n\nSchistocyte urgency (> {limit:g} %) on {slides} slides of {cells} cells per composition, drawn with "
            "replacement from the held-out cells of each class (the rest normal), read as `score` reads a slide:\n\n"
            f"| slide | true {urgent_class} % | urgent, called counts | mean % called | urgent, corrected | "
            "mean % corrected | review or urgent, corrected |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


def score(bundle: ModelBundle, crops: list[np.ndarray], threads: int, backend: str):
    """Decisions of every crop (in order) and the seconds the estimator took."""
    be = create_backend(bundle, backend, threads=threads)
    parts, seconds = [], 0.0
    for s in range(0, len(crops), CHUNK):
        batch = crops_to_batch(crops[s:s + CHUNK], bundle, CHULA_UM_PER_PX)
        t0 = time.perf_counter()
        parts.append(score_cells_fast(batch, bundle, be).decisions)
        seconds += time.perf_counter() - t0
    return concat_decisions(parts), seconds


def summary(y: np.ndarray, d, names: list[str]) -> dict:
    k = len(names)
    pred = d.class_id
    counts = np.bincount(y, minlength=k)
    measured = counts >= MIN_CELLS
    recall = m.per_class_recall(y, pred, k)
    schisto = names.index("schistocyte")
    positive = y == schisto
    sens, spec = m.sensitivity_specificity(pred == schisto, positive)
    best = m.specificity_at_sensitivity(d.probabilities[:, schisto], positive, TARGET_RECALL)
    return {"balanced": float(recall[measured].mean()), "measured": int(measured.sum()), "accuracy": float((pred == y).mean()),
            "schisto_recall": sens, "schisto_spec": spec, "best": best,
            "schisto_auroc": m.auroc(d.probabilities[:, schisto], positive)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chula_rbc12"))
    ap.add_argument("--model", type=Path, action="append", help="bundle(s); the first gets the full report")
    ap.add_argument("--half", choices=["held-out", "measure"], default="held-out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="onnxruntime-cpu")
    ap.add_argument("--fields", type=int, help="only the first N fields (a quick check; not with --write)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if args.write and args.fields:
        ap.error("--write measures every held-out field; drop --fields")
    if not args.data.is_dir():
        print(f"{args.data}: not here (real data is not shipped); nothing to measure", file=sys.stderr)
        return 0
    models = args.model or [Path("models/rbc32-ddpm")]
    crops, y, field_of = labelled_cells(args.data, args.half, args.fields)
    n_fields = len(np.unique(field_of))
    rows, body = [], ""
    for i, path in enumerate(models):
        bundle = ModelBundle.load(path)
        if bundle.class_names != CHULA_CLASSES:
            raise SystemExit(f"{path}: classes {bundle.class_names} are not Chula's {CHULA_CLASSES}")
        d, seconds = score(bundle, crops, args.threads, args.backend)
        s = summary(y, d, bundle.class_names)
        prov = bundle.manifest["provenance"]
        rows.append(f"| `{path}` | {prov.get('class_balance_power')} | {prov['steps']} ({prov['train_minutes']} min) | "
                    f"**{s['balanced']:.3f}** | {s['accuracy']:.3f} | {s['schisto_recall']:.3f} / {s['schisto_spec']:.3f} | "
                    f"{s['best']['specificity']:.3f} | {s['schisto_auroc']:.3f} | {len(y) / seconds:.0f} |")
        print(rows[-1], flush=True)
        if i == 0:
            body = full_report(bundle, y, d, s, seconds, n_fields, args.threads, args.half)
            if bundle.grading is not None:
                g = {mode: grading_agreement(y, d, field_of, bundle, mode) for mode in ("corrected", "called", "expected")}
                body += ("\n\nPer-field ICSH grade (0/1+/2+/3+, the bundle's grading.json) from the model's reading of a "
                         "field's labelled cells against the grade from their labels, (field, feature) pairs that agree "
                         "(target ≥ 90 %):\n\n| shares read from | agreement | by feature |\n|---|---|---|\n" +
                         "\n".join(f"| {mode} | **{r['agreement']:.1%}** of {r['pairs']} | " +
                                   ", ".join(f"{k} {v:.0%}" for k, v in r["by_feature"].items()) + " |"
                                   for mode, r in g.items()) +
                         "\n\ncorrected: the shares corrected for the model's confusions (EM prior adjustment, "
                         "runtime/prior_shift.py), as `score` grades a slide; called: classify and count; expected: "
                         "the sum of each class's calibrated probability.")
                if bundle.grading.get("urgent") and bundle.grading.get("share_estimate"):
                    body += urgency_on_resampled_slides(y, d, bundle)
    body += ("\n\n| bundle | class balance power | steps | balanced accuracy | accuracy | schistocyte recall / specificity "
             f"(argmax) | specificity at recall {TARGET_RECALL:.2f} | schistocyte AUROC | cells/s |\n"
             "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("rbc-model", "Red-cell morphology bundle (Chula RBC-12, held-out fields)", body)
    return 0


def full_report(bundle: ModelBundle, y: np.ndarray, d, s: dict, seconds: float, n_fields: int, threads: int,
                half: str) -> str:
    names, k = bundle.class_names, len(bundle.class_names)
    cm = m.confusion_matrix(y, d.class_id, k)
    recall = m.per_class_recall(y, d.class_id, k)
    precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
    prov = bundle.manifest["provenance"]
    confident = ~(d.uncertain | d.anomalous)
    lines = [
        f"`{bundle.path}` ({prov['steps']} steps, {prov['train_minutes']} min on one CPU thread, class balance power "
        f"{prov.get('class_balance_power')}), on every labelled cell of the {half!r} fields: {len(y)} cells of "
        f"{n_fields} fields (split by content hash, training/rbc_data), each cut at Chula's one dataset scale "
        f"({CHULA_UM_PER_PX} µm/px) and read by the fast estimator ({threads} threads, ONNX Runtime CPU).\n",
        "| measure | result | target |\n|---|---|---|",
        f"| balanced accuracy ({s['measured']} classes with ≥ {MIN_CELLS} held-out cells) | **{s['balanced']:.3f}** | ≥ 0.75 |",
        f"| accuracy | {s['accuracy']:.3f} | |",
        f"| schistocyte recall / specificity (predicted class) | {s['schisto_recall']:.3f} / {s['schisto_spec']:.3f} | "
        "recall ≥ 0.90 at specificity ≥ 0.98 |",
        f"| best specificity at schistocyte recall ≥ {TARGET_RECALL:.2f} (threshold on P(schistocyte) "
        f"{s['best']['threshold']:.3g}) | {s['best']['specificity']:.3f} (recall {s['best']['sensitivity']:.3f}) | ≥ 0.98 |",
        f"| schistocyte AUROC (P(schistocyte)) | {s['schisto_auroc']:.3f} | |",
        f"| confident cells (not uncertain, not anomalous) / their accuracy | {confident.mean():.3f} / "
        f"{(d.class_id == y)[confident].mean() if confident.any() else float('nan'):.3f} | |",
        f"| cells per second (estimator only) | {len(y) / seconds:.0f} | |",
        "\n| class | held-out cells | recall | precision |\n|---|---|---|---|",
    ]
    lines += [f"| {n} | {int((y == c).sum())} | {recall[c]:.3f} | {precision[c]:.3f} |" for c, n in enumerate(names)]
    short = [n[:6] for n in names]
    lines += ["\nConfusion matrix (rows: label, columns: prediction):\n",
              "| label \\ predicted | " + " | ".join(short) + " |", "|---|" + "---|" * k]
    lines += [f"| {n} | " + " | ".join(str(int(v)) for v in cm[c]) + " |" for c, n in enumerate(names)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
