"""``cytoedge adapt --data DIR --model BUNDLE --out NEW_BUNDLE``: adapt a bundle to a lab's own scanner and stain.

DIR holds a few labelled cells of the lab, ``DIR/<class>/<image>``, for any subset of the bundle's
classes: single-cell crops (as ``classify`` reads them), or with ``--fields`` fields holding one white
cell each (as ``score`` reads them). Or, with ``--reviews EXPORT...`` instead of ``--data``, the cells a
reader confirmed or reclassified on review pages (review.html's exported corrections), cut again from
their slides as ``score`` cuts them. The cells are split into a fixed stratified part A, to fit on, and
a held part B.

* ``features`` (no torch): the network is unchanged; every class's denoising error is measured on the
  cells and the calibration refitted on them: probe weights with a per-class, per-probe error offset,
  temperatures, abstention, anomaly and conformal thresholds (calibration/fit.py) on A, thresholds on B.
* ``finetune`` (the torch extra): the denoiser is first fine-tuned on A's cells (training/site_finetune.py,
  at most ``--steps`` steps or ``--max-minutes``), exported to ONNX, and then calibrated as above.

Both refit the out-of-domain alarm's reference on B. What the command prints on the held part
(balanced accuracy before and after) is what to expect on the lab's other cells of those classes;
classes not labelled are not measured. It also prints how right the cells labelled confident are on
B, as a lower confidence bound under B's own class mix and under the expected smear differential (the
triage reference ranges' midpoints): the abstention threshold is set so that both reach the target, since
B holds as many cells of each class and a smear is mostly neutrophils and lymphocytes.

The source bundle is untouched; NEW_BUNDLE is a full bundle with its own provenance (source bundle
hash, data hash, method, cells, time). The INT8 graph is not carried over: its decision check belongs to
the source calibration (run `cytoedge quantize` on the new bundle).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from cytoedge.runtime.commands.common import (CROP_SCALE_HELP, add_labelled_data_arguments, add_model_arguments,
                                              add_um_per_px_argument, bounded_int, load_bundle_and_backend,
                                              progress_bar)
from cytoedge.runtime.errors import CalibrationError, CytoedgeError

# Refusals: with fewer cells per class the A/B split leaves 2 to check a class on; with a larger ratio
# between the largest and smallest class the fit is the largest class's.
MIN_CELLS_PER_CLASS = 5
MAX_IMBALANCE = 10.0
METHODS = ("features", "finetune")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="adapt a bundle to a lab's scanner and stain from a few labelled cells",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_labelled_data_arguments(p, every_class=False)
    add_model_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="folder of the new bundle (must not exist, or be empty)")
    p.add_argument("--method", choices=METHODS, default="features",
                   help="features: refit the calibration with per-class error offsets (no torch); finetune: "
                        "fine-tune the denoiser on the cells first (needs the torch extra)")
    p.add_argument("--steps", type=bounded_int(1, 100_000), default=300, help="finetune: at most this many steps")
    p.add_argument("--max-minutes", type=float, default=10.0, help="finetune: at most this many minutes of training")
    p.add_argument("--fields", action="store_true",
                   help="the images are fields with one white cell each (read as `score` does), not crops")
    p.add_argument("--per-class", type=bounded_int(MIN_CELLS_PER_CLASS, 100_000), default=None,
                   help="use at most this many cells of each class (a random draw, --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --per-class draw")
    add_um_per_px_argument(p, CROP_SCALE_HELP + "; fields: their own scale, from the red cells")
    p.set_defaults(func=run)


def check_site_labels(labels: np.ndarray, class_names: list[str], what: str) -> None:
    """Refuse data too small or too unbalanced to adapt on, saying what is needed."""
    counts = {class_names[c]: int((labels == c).sum()) for c in np.unique(labels)}
    if len(counts) < 2:
        raise CalibrationError(f"{what}: labelled cells of {len(counts)} class ({', '.join(counts) or 'none'}); "
                               "adapting needs at least two classes")
    short = [f"{c} ({n})" for c, n in counts.items() if n < MIN_CELLS_PER_CLASS]
    if short:
        raise CalibrationError(f"{what}: too few labelled cells in {', '.join(short)}; adapting needs at least "
                               f"{MIN_CELLS_PER_CLASS} of each class given (20 or more is what RESULTS.md measures)")
    big, small = max(counts, key=counts.get), min(counts, key=counts.get)
    if counts[big] > MAX_IMBALANCE * counts[small]:
        raise CalibrationError(f"{what}: {big} has {counts[big]} cells and {small} {counts[small]}: more than "
                               f"{MAX_IMBALANCE:g}x apart; add {small} cells or pass --per-class "
                               f"{int(MAX_IMBALANCE * counts[small])} or less")


def prepare_out(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise CytoedgeError(f"--out {out} is the source bundle; adapt writes a new bundle and leaves the source as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CytoedgeError(f"--out {out} already exists and is not an empty folder; choose a new folder")


def copy_bundle(bundle, out: Path):
    """The source bundle's files in a new folder ``out``, without the INT8 graph, renamed."""
    from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest

    manifest = json.loads((bundle.path / MANIFEST).read_text())
    int8 = manifest.get("networks", {}).pop("denoiser_int8", None)
    drop = {int8["file"]} if int8 else set()
    out.mkdir(parents=True)
    for name in manifest["files"]:
        if name not in drop:
            shutil.copy2(bundle.path / name, out / name)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k not in drop}
    manifest["name"] = f"{manifest['name']}-adapted"
    write_manifest(out, manifest)
    return ModelBundle.load(out)


def source_race_on(E: np.ndarray, bundle, candidates) -> np.ndarray | None:
    """Class gaps of the source calibration's race on measured errors, where its probes are among the
    candidates measured (else None: no 'before' figure)."""
    from cytoedge.calibration.fit import offline_race
    from cytoedge.runtime.estimator import probes_from_calibration

    probes, settings = probes_from_calibration(bundle)
    index = {p: j for j, p in enumerate(candidates)}
    if not all(p in index for p in probes):
        return None
    chosen = [index[p] for p in probes]
    k = len(bundle.class_names)
    return offline_race(E[:, :k, chosen], settings).gaps


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.labelled_data import stratified_subset
    from cytoedge.runtime.site_cells import crop_cells, field_cells, labelled_folder
    from cytoedge.runtime.slide_scoring import ScoringOptions

    started = time.time()
    bundle, backend, _ = load_bundle_and_backend(args)
    if bundle.calibration is None:
        raise CalibrationError(f"{bundle.path} has no calibration to adapt; run `cytoedge calibrate` on it first")
    prepare_out(args.out, bundle.path)
    if args.method == "finetune" and importlib.util.find_spec("torch") is None:
        raise CytoedgeError("--method finetune needs the torch extra (pip install 'cytoedge[torch]')")
    names = bundle.class_names
    if args.reviews:
        cells = reviewed_cells(args, bundle, backend)
    else:
        files, labels = labelled_folder(args.data, bundle)
        keep = stratified_subset(labels, args.per_class, args.seed)
        files, labels = [files[i] for i in keep], labels[keep]
        check_site_labels(labels, names, str(args.data))
        if args.fields:
            cells = field_cells(files, labels, bundle, backend, ScoringOptions(um_per_px=args.um_per_px,
                                                                               heatmaps=False))
            skipped = "; ".join(f"{Path(k['image']).name}: {k['reason']}" for k in cells.skipped[:3])
            check_site_labels(cells.labels, names, f"{args.data} (fields with one white cell found; "
                                                   f"{len(cells.skipped)} skipped{': ' + skipped if skipped else ''})")
        else:
            cells = crop_cells(files, labels, bundle, args.um_per_px)
    y = cells.labels
    work = args.out.with_name(f".{args.out.name}.partial-{os.getpid()}")
    try:
        out, backend, finetune = build_adapted(args, bundle, backend, cells, work)
        out, report = calibrate_adapted(args, bundle, out, backend, cells, finetune)
        if args.out.exists():
            args.out.rmdir()  # prepare_out allowed only an empty folder
        os.replace(work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for skip in cells.skipped[:5]:
        print(f"skipped {skip['image']}: {skip['reason']}")
    if len(cells.skipped) > 5:
        print(f"... and {len(cells.skipped) - 5} more fields skipped")
    print(f"adapted {bundle.name} to {data_description(args)}: {len(y)} cells of {len(np.unique(y))} classes "
          f"({', '.join(f'{names[c]} {int((y == c).sum())}' for c in np.unique(y))}), method {args.method}, "
          f"{time.time() - started:.0f} s")
    print(f"held part ({report['held_cells']} cells): balanced accuracy {report['before']} before, "
          f"{report['after']:.3f} after -> {args.out}")
    print("\n".join(report["confident"]))
    return 0


def confident_lines(fitted: dict) -> list[str]:
    """What the abstention threshold read on the held part under each class mix (calibration/fit.py), in
    words: how sure a lab may be of the cells the adapted bundle labels confident."""
    s, tau = fitted["settings"], fitted["abstention_threshold"]
    need = (f"a {s['site_accuracy_bound_confidence']:.0%} lower bound on the held part's accuracy >= "
            f"{s['site_selective_accuracy']:.2f} under every class mix")
    lines = [f"confident cells: top-class probability >= {tau:.3f}, where {need}:" if tau <= 1 else
             f"confident cells: none (no threshold gives {need}; more labelled cells per class narrow the "
             "bound); with every held cell kept:"]
    for check in fitted["abstention_check"]:
        mix = ", ".join(f"{c} {v:.2f}" for c, v in sorted(s["site_prevalences"][check["prevalence"]].items(),
                                                            key=lambda cv: -cv[1]))
        read = ("none kept" if check["bound"] is None else
                f"{check['kept_cells']} kept ({check['effective_cells']:.1f} effective), accuracy "
                f"{check['accuracy']:.3f}, lower bound {check['bound']:.3f}")
        lines.append(f"  {check['prevalence']} ({mix}): {read}")
    return lines


def input_kind(args) -> str:
    return "reviews" if args.reviews else "fields" if args.fields else "crops"


def data_description(args) -> str:
    """What the cells came from, for messages and provenance."""
    return "reviews " + ", ".join(map(str, args.reviews)) if args.reviews else str(args.data)


def reviewed_cells(args, bundle, backend):
    """The reviewed cells of ``--reviews``, cut again from their slides."""
    from cytoedge.runtime.site_cells import review_cells, reviewed_labels
    from cytoedge.runtime.slide_scoring import ScoringOptions

    exports, labels = reviewed_labels(args.reviews, bundle, args.per_class, args.seed)
    what = f"{len(exports)} review export(s)"
    check_site_labels(labels, bundle.class_names, what)
    cells = review_cells(exports, bundle, backend, ScoringOptions(um_per_px=args.um_per_px, heatmaps=False))
    check_site_labels(cells.labels, bundle.class_names,
                      f"{what} (cells found again on their slides; {len(cells.skipped)} not)")
    return cells


def build_adapted(args, bundle, backend, cells, work: Path):
    """The new bundle's files in ``work``: the source's, with the fine-tuned network for ``finetune``.
    Returns the bundle there, a backend on its network, and the fine-tune's record (None for features)."""
    from cytoedge.calibration.fit import DEFAULT_SETTINGS, split_ab
    from cytoedge.runtime.backends.select import create_backend

    out = copy_bundle(bundle, work)
    if args.method == "features":
        return out, backend, None
    from cytoedge.export.onnx_export import export_denoiser_onnx, max_abs_error_vs_torch
    from cytoedge.training.site_finetune import FINETUNE_SETTINGS, cell_windows, finetune_denoiser
    from cytoedge.runtime.bundle import MANIFEST, write_manifest

    part_a, _ = split_ab(cells.labels, DEFAULT_SETTINGS["split_a_fraction"], DEFAULT_SETTINGS["seed"])
    windows = cell_windows(cells.batches)[part_a]
    try:
        with progress_bar(args.steps, "steps") as bar:
            model, steps, minutes = finetune_denoiser(bundle, windows, cells.labels[part_a], args.steps,
                                                      args.max_minutes, args.seed, lambda _: bar.update(1))
    except ValueError as e:  # a bundle the project's trainer cannot rebuild (another class list)
        raise CytoedgeError(f"--method finetune: {e}") from None
    staged = export_denoiser_onnx(model, work / ".denoiser.onnx.new", model.config.image_size)
    error = max_abs_error_vs_torch(model, staged, model.config.image_size)
    manifest = json.loads((work / MANIFEST).read_text())
    write_manifest(work, manifest, staged={manifest["networks"]["denoiser"]["file"]: staged})
    backend.close()
    from cytoedge.runtime.bundle import ModelBundle

    out = ModelBundle.load(work)
    record = {"cells": int(len(part_a)), "steps": int(steps), "minutes": round(minutes, 2),
              "export_max_abs_error_vs_torch": error, "settings": FINETUNE_SETTINGS}
    return out, create_backend(out, args.backend, threads=args.threads), record


def calibrate_adapted(args, source, out, backend, cells, finetune: dict | None):
    """Measure, fit and write the calibration and the alarm's reference of the new bundle ``out``."""
    from cytoedge.calibration.artefact import DEFAULT_CANDIDATES, candidate_probes, write_calibration
    from cytoedge.calibration.domain import fit_domain, write_domain
    from cytoedge.calibration.fit import fit_calibration, offline_race, split_ab
    from cytoedge.calibration.metrics import balanced_accuracy
    from cytoedge.runtime.bundle import MANIFEST, ModelBundle, write_manifest
    from cytoedge.runtime.estimator import noise_bank, probes_from_calibration
    from cytoedge.runtime.commands.calibrate import measure_errors
    from cytoedge.runtime.site_cells import data_sha256

    names, y = source.class_names, cells.labels
    candidates = candidate_probes(DEFAULT_CANDIDATES["timesteps"], DEFAULT_CANDIDATES["replicas"])
    noise = noise_bank(out, len(candidates), DEFAULT_CANDIDATES["noise_seed"])
    E = measure_errors(out, backend, cells.batches, len(y), candidates, noise)
    backend.close()
    fitted = fit_calibration(E, y, names, source.abnormal_classes, site_of=source.calibration)
    _, part_b = split_ab(y, fitted["settings"]["split_a_fraction"], fitted["settings"]["seed"])
    # 'before' is the source network and calibration on the same cells: only measurable here when the
    # network is the source's (features); a fine-tune's is measured by running `evaluate` on both.
    before = source_race_on(E[part_b], source, candidates) if finetune is None else None
    adaptation = {
        "method": args.method, "source_bundle": str(source.path), "source_bundle_sha256": source.sha256,
        "data": data_description(args), "data_sha256": data_sha256(cells.files, y, names),
        "input": input_kind(args),
        "cells": {names[c]: int((y == c).sum()) for c in np.unique(y)}, "skipped_fields": len(cells.skipped),
        "per_class": args.per_class, "seed": args.seed, "scale": cells.scale,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": f"cytoedge adapt --method {args.method}" + {"fields": " --fields", "reviews": " --reviews"}.get(
            input_kind(args), ""),
        "abstention_check": fitted["abstention_check"],
        **({"finetune": finetune} if finetune else {}),
    }
    manifest = json.loads((out.path / MANIFEST).read_text())
    manifest["adaptation"] = adaptation
    write_manifest(out.path, manifest)
    out = ModelBundle.load(out.path)
    provenance = {"data": data_description(args), "cells": int(len(y)), "crop_scale": cells.scale, "backend": backend.name,
                  "candidates": DEFAULT_CANDIDATES, "command": adaptation["command"],
                  "adapted_from_calibration": source.calibration.provenance.get("date")}
    write_calibration(out, fitted, candidates, DEFAULT_CANDIDATES["noise_seed"], provenance)
    out = ModelBundle.load(out.path)
    probes, settings = probes_from_calibration(out)
    chosen = [candidates.index(p) for p in probes]
    k = len(names)
    race_b = offline_race(E[part_b][:, :k, chosen], settings, E[part_b][:, k, chosen] if E.shape[1] > k else None)
    called = [names[c] for c in race_b.gaps.argmin(1)]
    domain = fit_domain(race_b.leader_errors, race_b.null_errors, called, out.calibration.anomaly_normalisation)
    write_domain(out, {"format_version": 1, **domain, "provenance": {
        "data": data_description(args), "part": "B of the adaptation's A/B split", "cells": int(len(part_b)),
        "calibration_sha256": out.manifest["files"][out.manifest["calibration"]]["sha256"],
        "command": adaptation["command"]}})
    report = {"held_cells": int(len(part_b)), "after": balanced_accuracy(y[part_b], race_b.gaps.argmin(1), k),
              "before": "not measured" if before is None else f"{balanced_accuracy(y[part_b], before.argmin(1), k):.3f}",
              "confident": confident_lines(fitted)}
    return ModelBundle.load(out.path), report
