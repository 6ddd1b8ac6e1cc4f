"""Agreement between the model and a human reader, the figures of a silent-mode pilot (`cytoedge
compare`), and the lab's pass/fail thresholds on them. Pure: labels in, a JSON-ready report out.

The reader is the reference. Per class: sensitivity and specificity one class against the rest (the
metrics `cytoedge evaluate` reports come from the same functions, calibration/metrics.py, so a
labelled folder gives the same figures either way); Cohen's unweighted κ with its large-sample 95 %
interval; the confusion matrix, rows the reader. Per slide: each one's differential over the cells the
reader labelled, and whether the model's share of each class lies inside the reader's Rümke 95 %
interval, the exact binomial interval CLSI H20-A2 tabulates for a differential count: a model inside
it differs from the reader by no more than a second count of the same cells would.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from cytoedge.calibration import metrics as m
from cytoedge.runtime.errors import CytoedgeError

LEVEL = 0.95


def _value(x: float) -> float | None:
    """A float for JSON: None where undefined (NaN)."""
    return None if x is None or np.isnan(x) else float(x)


def agreement(reader: np.ndarray, model: np.ndarray, class_names: list[str]) -> dict:
    """Per-class counts, sensitivity and specificity, accuracy, balanced accuracy, κ and the confusion
    matrix of the model's calls ``model`` against the reader's labels ``reader`` (class ids)."""
    k = len(class_names)
    cm = m.confusion_matrix(reader, model, k)
    sensitivity = m.per_class_recall(reader, model, k)
    specificity = m.per_class_specificity(reader, model, k)
    kappa, se = m.cohens_kappa(cm)
    z = NormalDist().inv_cdf(0.5 + LEVEL / 2)
    ci = [None, None] if np.isnan(kappa) else [max(-1.0, kappa - z * se), min(1.0, kappa + z * se)]
    return {
        "cells": int(len(reader)),
        "accuracy": float(np.trace(cm) / max(len(reader), 1)),
        "balanced_accuracy": m.balanced_accuracy(reader, model, k),
        "kappa": {"value": _value(kappa), "se": _value(se), "ci95": ci,
                  "method": "Cohen's unweighted kappa; large-sample SE (Fleiss, Cohen & Everitt 1969); "
                            "CI kappa +/- 1.96 SE"},
        "per_class": {name: {"reader": int(cm[c].sum()), "model": int(cm[:, c].sum()), "agreed": int(cm[c, c]),
                             "sensitivity": _value(sensitivity[c]), "specificity": _value(specificity[c])}
                      for c, name in enumerate(class_names)},
        "confusion_matrix": {"rows_reader_cols_model": list(class_names), "counts": cm.tolist()},
    }


def differential(reader: np.ndarray, model: np.ndarray, class_names: list[str],
                 differential_classes: list[str]) -> dict:
    """One slide's differential by the reader and by the model over the same cells (those the reader
    labelled), each over its own cells of ``differential_classes`` (platelets are not counted in a
    white-cell differential), with the reader's Rümke interval of each class."""
    ids = [class_names.index(c) for c in differential_classes]
    n_reader, n_model = int(np.isin(reader, ids).sum()), int(np.isin(model, ids).sum())
    classes = {}
    for c in ids:
        r, mo = int((reader == c).sum()), int((model == c).sum())
        rp = 100.0 * r / n_reader if n_reader else None
        mp = 100.0 * mo / n_model if n_model else None
        lo, hi = m.rumke_interval(r, n_reader, LEVEL) if n_reader else (float("nan"), float("nan"))
        classes[class_names[c]] = {
            "reader_count": r, "reader_percent": rp, "model_count": mo, "model_percent": mp,
            "difference_pp": mp - rp if rp is not None and mp is not None else None,
            "reader_rumke95_percent": [_value(100 * lo), _value(100 * hi)],
            "model_inside": bool(100 * lo <= mp <= 100 * hi) if rp is not None and mp is not None else None,
        }
    diffs = [abs(v["difference_pp"]) for v in classes.values() if v["difference_pp"] is not None]
    return {"reader_cells": n_reader, "model_cells": n_model, "classes": classes,
            "max_abs_difference_pp": max(diffs) if diffs else None,
            "outside_rumke": [c for c, v in classes.items() if v["model_inside"] is False]}


def slide_differentials(slides: list[str | None], reader: np.ndarray, model: np.ndarray, class_names: list[str],
                        differential_classes: list[str]) -> list[dict]:
    """``differential`` of each slide (cells whose slide is None, crops, have none), in first-seen order."""
    slides_arr = np.array([s if s is not None else "" for s in slides], dtype=object)
    out = []
    for source in dict.fromkeys(s for s in slides if s is not None):
        sel = slides_arr == source
        out.append({"source": source, "cells": int(sel.sum()),
                    **differential(reader[sel], model[sel], class_names, differential_classes)})
    return out


@dataclass(frozen=True)
class Thresholds:
    """What a lab requires of a pilot. A per-class bound is (class, value); class None means every
    class the reader labelled, and a named class overrides it."""

    min_kappa: float | None = None
    min_sensitivity: tuple[tuple[str | None, float], ...] = ()
    min_specificity: tuple[tuple[str | None, float], ...] = ()
    max_differential_diff_pp: float | None = None

    def check_classes(self, class_names: list[str]) -> None:
        """CytoedgeError for a per-class bound naming a class the model does not have."""
        for option, pairs in (("--min-sensitivity", self.min_sensitivity),
                              ("--min-specificity", self.min_specificity)):
            for cls, _ in pairs:
                if cls is not None and cls not in class_names:
                    raise CytoedgeError(f"{option} {cls}=…: {cls!r} is not a class of the model {class_names}")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("min_sensitivity", "min_specificity"):
            d[key] = {("all" if cls is None else cls): v for cls, v in d[key]}
        return d


def _class_bounds(pairs: tuple[tuple[str | None, float], ...], class_names: list[str]) -> dict[str, tuple[float, bool]]:
    """Class → (bound, named explicitly)."""
    everyone = [v for cls, v in pairs if cls is None]
    out = {c: (everyone[-1], False) for c in class_names} if everyone else {}
    out.update({cls: (v, True) for cls, v in pairs if cls is not None})
    return out


def threshold_failures(report: dict, slides: list[dict], thresholds: Thresholds) -> list[str]:
    """Each bound the pilot misses, in words. A class the reader never labelled has no sensitivity:
    that fails only a bound that names the class (there is nothing to measure it on)."""
    failures = []
    kappa = report["kappa"]["value"]
    if thresholds.min_kappa is not None:
        if kappa is None:
            failures.append(f"kappa is undefined (one class throughout) and --min-kappa is {thresholds.min_kappa}")
        elif kappa < thresholds.min_kappa:
            failures.append(f"kappa {kappa:.3f} < --min-kappa {thresholds.min_kappa}")
    for metric, pairs in (("sensitivity", thresholds.min_sensitivity), ("specificity", thresholds.min_specificity)):
        for cls, (bound, named) in _class_bounds(pairs, list(report["per_class"])).items():
            value = report["per_class"][cls][metric]
            if value is None:
                if named:
                    why = f"no cell is {cls}" if metric == "sensitivity" else f"every cell is {cls}"
                    failures.append(f"{metric} of {cls} cannot be measured (by the reader, {why}) and "
                                    f"--min-{metric} {cls}={bound} asks for it")
            elif value < bound:
                failures.append(f"{metric} of {cls} {value:.3f} < --min-{metric} {bound}")
    if thresholds.max_differential_diff_pp is not None:
        for slide in slides:
            for cls, v in slide["classes"].items():
                if v["difference_pp"] is not None and abs(v["difference_pp"]) > thresholds.max_differential_diff_pp:
                    failures.append(f"{slide['source']}: {cls} model {v['model_percent']:.1f} % vs reader "
                                    f"{v['reader_percent']:.1f} %: {abs(v['difference_pp']):.1f} pp > "
                                    f"--max-differential-diff {thresholds.max_differential_diff_pp}")
    return failures
