"""Slide urgency on resampled slides of real cells: urgent from the count of flagged cells against urgent
from the abnormal classes' share corrected for the model's confusions (runtime/summary.py).

  python benchmarks/bench_slide_triage.py [--data ../shared/data/pbc/calib] [--threads 2] [--slides 100] [--write]

The held-out half of the labelled folder is scored once by the fast estimator, as `classify` reads crops.
Each slide is then drawn from those cells with replacement: a normal adult differential (neutrophils 58 %,
lymphocytes 30 %, monocytes 6 %, eosinophils 4 %, basophils 2 %) with a share of abnormal cells (half
immature granulocytes, half erythroblasts) put in, and read by the product's triage with the bundle's
policy, once from the flag count and once corrected. The cells' pictures are not resampled, only their
calls and probabilities, so a slide's cells are not independent draws of new cells: the rates are those of
this held-out set.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from cytoedge.models import default_bundle_path
from cytoedge.runtime.backends.select import create_backend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.classify_cells import fast_records, score_cells_fast
from cytoedge.runtime.labelled_data import labelled_subset
from cytoedge.runtime.site_cells import crop_cells
from cytoedge.runtime.summary import SlideTally, TriagePolicy, summarise_slide

NORMAL = {"neutrophil": 0.58, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.04, "basophil": 0.02}
ABNORMAL = {"ig": 0.5, "erythroblast": 0.5}
SHARES = (0.0, 0.02, 0.05, 0.08, 0.15)
SIZES = (100, 200)


def held_out_records(bundle: ModelBundle, data: Path, threads: int) -> tuple[list[dict], np.ndarray]:
    files, labels = labelled_subset(data, bundle.class_names, "held-out", None)
    cells = crop_cells(files, labels, bundle, None)
    backend = create_backend(bundle, "onnxruntime-cpu", threads=threads)
    records = [r for b in cells.batches for r in fast_records(score_cells_fast(b, bundle, backend), bundle.class_names)]
    for i, r in enumerate(records):  # what a slide's record has besides the reading: a crop has no place
        r.update(id=i, centre=[0, 0], bbox=[0, 0, 0, 0])
    return records, labels


def read_slide(records: list[dict], bundle: ModelBundle, policy: TriagePolicy) -> tuple[str, float]:
    """Level and abnormal share (%) of one resampled slide, read by the product's summarise_slide (its
    uncertain and anomalous cells and the out-of-domain alarm included); no scale or stain map."""
    summary = summarise_slide(records, SlideTally("resampled slide"), None, None, bundle, policy, bin_um=100.0)
    corrected = summary["corrected_shares"]
    share = corrected["abnormal"]["percent"] if policy.urgent_abnormal_from == "corrected" and corrected \
        else 100 * len(summary["abnormal_cells"]) / len(records)
    return summary["triage"]["level"], share


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/pbc/calib"))
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"{args.data}: not here (real data is not shipped); nothing to measure", file=sys.stderr)
        return 0
    bundle = ModelBundle.load(args.model or default_bundle_path())
    names, abnormal = bundle.class_names, list(bundle.abnormal_classes)
    records, labels = held_out_records(bundle, args.data, args.threads)
    pools = {c: np.flatnonzero(labels == names.index(c)) for c in names}
    policy = TriagePolicy.from_bundle(bundle)
    policies = {"flagged": replace(policy, urgent_abnormal_from="flagged"),
                "corrected": replace(policy, urgent_abnormal_from="corrected")}
    rng = np.random.default_rng(0)
    rows = []
    for n in SIZES:
        for a in SHARES:
            mix = {**{c: f * (1 - a) for c, f in NORMAL.items()}, **{c: f * a for c, f in ABNORMAL.items()}}
            p = np.array(list(mix.values()))
            out: dict[str, list] = {m: [] for m in policies}
            for _ in range(args.slides):
                cls = rng.choice(list(mix), size=n, p=p / p.sum())
                slide = [records[rng.choice(pools[c])] for c in cls]
                for m, pol in policies.items():
                    out[m].append(read_slide(slide, bundle, pol))
            row = [str(n), f"{100 * a:g}"]
            for m in policies:
                row += [f"{np.mean([lv == 'urgent' for lv, _ in out[m]]):.0%}", f"{np.mean([s for _, s in out[m]]):.1f}"]
            row.append(f"{np.mean([lv != 'routine' for lv, _ in out['corrected']]):.0%}")
            rows.append("| " + " | ".join(row) + " |")
            print(rows[-1], flush=True)
    flags = np.array([r["flags"]["abnormal"] for r in records])
    truth = np.isin(labels, [names.index(c) for c in abnormal])
    body = (f"`{bundle.name}`, the held-out half of `{args.data}` ({len(records)} cells) scored once "
            f"by the fast estimator ({args.threads} threads); per-cell abnormal flag sensitivity {flags[truth].mean():.3f}, "
            f"specificity {1 - flags[~truth].mean():.3f}. {args.slides} slides per row, each drawn with replacement "
            "from those cells (normal adult differential, the abnormal share half ig, half erythroblasts), read by "
            f"runtime/summary.summarise_slide with the bundle's policy (urgent: ≥ {policy.urgent_min_abnormal} abnormal cells "
            f"and ≥ {policy.urgent_abnormal_fraction:.0%} of cells).\n\n"
            "| cells | true abnormal % | urgent, flag count | mean flagged % | urgent, corrected | mean corrected % | "
            "review or urgent, corrected |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
            "A slide with any abnormal or anomalous cell, or a fifth of its cells uncertain, is at least review, "
            "so 'review or urgent' counts every slide a reader is asked to look at; 'urgent, corrected' is what "
            "the urgency now says; the out-of-domain alarm turns an urgent slide into review. The corrected share reads below the truth "
            "where abnormal cells' probabilities spread to the classes they resemble (ig to neutrophils and "
            "monocytes): the correction is as good as the calibration on this site's cells.\n")
    print(body)
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from results_md import write_section

        write_section("slide-triage", "Slide urgency on resampled slides of real cells", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
