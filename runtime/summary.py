"""Slide summary: counts, differential, flagged cells, triage with reasons, abnormality density map.

Triage follows how a lab reads a smear: a routine slide has enough white cells for a
differential, no abnormal or anomalous cell, few uncertain calls and a differential inside the
reference ranges; anything else goes to *review* with the reasons; enough abnormal cells
(immature granulocytes, erythroblasts, … the bundle's ``abnormal_classes``) make it *urgent*.
"Enough" is read from the abnormal classes' share of the slide corrected for the model's confusions
(runtime/prior_shift.py), not from the count of flagged cells: a flag tuned for sensitivity on single
cells marks about one normal cell in eight, which made nearly every normal slide urgent. Flagged cells
that the corrected share does not confirm still send the slide to review.
The thresholds are a :class:`TriagePolicy`; a bundle may override them under ``triage`` in its
calibration.json (runtime/calibration_config.py). The defaults are the usual adult reference ranges
and a 100-cell differential; a site must validate its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from cytoedge.runtime.prior_shift import shares_with_interval
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.domain_alarm import records_alarm
from cytoedge.runtime.scale import ScaleEstimate

MAX_DENSITY_BINS = 64  # per side; the bin grows on big slides


def _default_ranges() -> dict[str, list[float]]:
    return {"neutrophil": [0.40, 0.75], "lymphocyte": [0.20, 0.45], "monocyte": [0.02, 0.10],
            "eosinophil": [0.0, 0.06], "basophil": [0.0, 0.02]}


@dataclass(frozen=True)
class TriagePolicy:
    min_white_cells: int = 100
    urgent_min_abnormal: int = 5
    urgent_abnormal_fraction: float = 0.05
    review_uncertain_fraction: float = 0.2
    review_min_anomalous: int = 1
    urgent_abnormal_from: str = "corrected"  # or "flagged": the count of cells flagged abnormal
    share_interval_resamples: int = 100  # bootstrap resamples of the corrected shares' 95 % interval
    differential_ranges: dict[str, list[float]] = field(default_factory=_default_ranges)
    not_in_differential: tuple[str, ...] = ("platelet",)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> "TriagePolicy":
        """The defaults with the bundle's calibration ``triage`` overrides."""
        return cls.from_overrides(bundle.calibration.triage if bundle.calibration else None)

    @classmethod
    def from_overrides(cls, triage: Mapping[str, Any] | None) -> "TriagePolicy":
        """The defaults with a calibration's ``triage`` overrides (checked at load against the schema, whose
        ``triage`` keys are this class's fields)."""
        overrides = dict(triage or {})
        if "not_in_differential" in overrides:
            overrides["not_in_differential"] = tuple(overrides["not_in_differential"])
        return cls(**overrides)

    def expected_differential(self, class_names: list[str], floor: float) -> dict[str, float]:
        """The class mix of a typical smear, ``{class: share}`` summing to 1 over ``class_names``: each
        reference range's midpoint, at least ``floor`` (a class without a range, e.g. ig or platelet, gets
        ``floor``: rare, not absent). What a site's confident calls are checked under (calibration/fit.py)."""
        raw = {c: max(sum(self.differential_ranges[c]) / 2 if c in self.differential_ranges else 0.0, floor)
               for c in class_names}
        total = sum(raw.values())
        if not total > 0:
            raise ValueError(f"no class of {class_names} has a positive expected share (floor {floor})")
        return {c: v / total for c, v in raw.items()}


@dataclass
class SlideTally:
    """What the tiles of a slide add up to besides its cells: size, tiles, area read, platelets and red
    cells counted, and the parts (fields) that could not be read."""

    name: str
    width: int = 0
    height: int = 0
    tiles: int = 0
    area_px: int = 0
    platelets: int = 0
    red_cells: int = 0
    failures: list[dict] = field(default_factory=list)


TRIAGE_ORDER = ("routine", "review", "urgent")


def join_triage(slide: dict, part: dict, what: str) -> dict:
    """The slide's triage with a part's (e.g. the red cells'): the more urgent level, both sets of reasons."""
    level = max(slide["level"], part["level"], key=TRIAGE_ORDER.index)
    reasons = [f"{what}: {r}" for r in part["reasons"]]
    return {"level": level, "reasons": (reasons + slide["reasons"]) if part["level"] == "urgent"
            else (slide["reasons"] + reasons)}


def corrected_shares(records: list[dict], names: list[str], abnormal: list[str], resamples: int) -> dict | None:
    """Each class's share of the slide's cells corrected for the model's confusions, in %, with a 95 %
    bootstrap interval, and the same for the abnormal classes together; None where a cell has no
    calibrated probabilities (the reference estimator)."""
    if not records or any(not r.get("probabilities") for r in records):
        return None
    p = np.array([[r["probabilities"].get(c, 0.0) for c in names] for r in records])
    shares, lo, hi = shares_with_interval(p, ([names.index(c) for c in abnormal],), resamples=resamples)

    def share(i: int) -> dict:
        return {"percent": round(100 * float(shares[i]), 3), "ci95_percent": [round(100 * float(lo[i]), 3),
                                                                               round(100 * float(hi[i]), 3)]}
    return {"by_class": {c: share(i) for i, c in enumerate(names)}, "abnormal": share(len(names)),
            "method": "EM prior adjustment of the calibrated probabilities (runtime/prior_shift.py), "
                      f"bootstrap 95 % interval over {resamples} resamples"}


def triage(flagged_classes: dict[str, int], n_cells: int, n_white: int, n_abnormal: int, n_uncertain: int,
           n_anomalous: int, differential: dict[str, float], policy: TriagePolicy,
           corrected_abnormal: dict | None = None) -> dict:
    """Level (routine / review / urgent) and the reasons, in words a haematologist reads.

    ``n_cells``: all scored cells; ``n_white``: those in the differential; ``flagged_classes``:
    predicted classes of the cells flagged abnormal; ``corrected_abnormal``: the abnormal classes' corrected
    share of the cells (``{"percent", "ci95_percent"}``), which decides urgency unless the policy says
    "flagged" or it is None.
    """
    reasons, level = [], "routine"
    frac_abn = n_abnormal / n_cells if n_cells else 0.0
    flagged = (f"{n_abnormal} abnormal cell{'s' if n_abnormal != 1 else ''} ({frac_abn:.1%} of cells; predicted "
               + ", ".join(f"{c} {k}" for c, k in sorted(flagged_classes.items())) + ")")
    if corrected_abnormal is None or policy.urgent_abnormal_from == "flagged":
        share, count = frac_abn, n_abnormal
    else:
        share = corrected_abnormal["percent"] / 100
        count = share * n_cells
        lo, hi = corrected_abnormal["ci95_percent"]
        flagged += (f"; abnormal classes {100 * share:.1f} % of cells once corrected for the model's confusions "
                    f"(95 % CI {lo:.1f}–{hi:.1f} %)")
    if count >= policy.urgent_min_abnormal - 1e-9 and share >= policy.urgent_abnormal_fraction and n_abnormal:
        level = "urgent"
        reasons.append(flagged)
    elif n_abnormal:
        level = "review"
        reasons.append(flagged)
    if n_anomalous >= policy.review_min_anomalous:
        level = "review" if level == "routine" else level
        reasons.append(f"{n_anomalous} cell{'s' if n_anomalous > 1 else ''} unlike any trained class (anomalous)")
    if n_cells and n_uncertain / n_cells >= policy.review_uncertain_fraction:
        level = "review" if level == "routine" else level
        reasons.append(f"{n_uncertain} uncertain calls ({n_uncertain / n_cells:.0%} of cells)")
    if n_white < policy.min_white_cells:
        level = "review" if level == "routine" else level
        reasons.append(f"only {n_white} white cells counted (a differential needs {policy.min_white_cells})")
    else:
        for cls, (lo, hi) in policy.differential_ranges.items():
            v = differential.get(cls)
            if v is not None and not (lo <= v <= hi):
                level = "review" if level == "routine" else level
                reasons.append(f"{cls} {v:.1%} outside {lo:.0%}–{hi:.0%}")
    if not reasons:
        reasons.append(f"{n_white} white cells, differential within reference ranges, nothing flagged")
    return {"level": level, "reasons": reasons}


def density_map(records: list[dict], width: int, height: int, um_per_px: float, bin_um: float) -> dict:
    """White and abnormal cell counts on a grid over the slide (bin side in µm and in source px)."""
    bin_px = max(bin_um / um_per_px, max(width, height, 1) / MAX_DENSITY_BINS, 1.0)
    cols, rows = max(1, math.ceil(width / bin_px)), max(1, math.ceil(height / bin_px))
    white = np.zeros((rows, cols), np.int64)
    abnormal = np.zeros((rows, cols), np.int64)
    for r in records:
        x, y = r["centre"]
        i, j = min(int(y // bin_px), rows - 1), min(int(x // bin_px), cols - 1)
        white[i, j] += 1
        abnormal[i, j] += bool(r["flags"].get("abnormal"))
    return {"bin_px": round(bin_px, 3), "bin_um": round(bin_px * um_per_px, 3), "rows": rows, "cols": cols,
            "white": white.tolist(), "abnormal": abnormal.tolist()}


def _cell_ref(r: dict) -> dict:
    p = (r.get("probabilities") or {}).get(r["class"])
    return {"id": r["id"], "class": r["class"], "centre": r["centre"], "bbox": r["bbox"], "field": r.get("field", ""),
            "probability": p, "abnormal_probability": (r.get("estimator_detail") or {}).get("abnormal_probability")}


def summarise_slide(records: list[dict], tally: SlideTally, scale: ScaleEstimate | None, stain: dict | None,
                    bundle: ModelBundle, policy: TriagePolicy, bin_um: float) -> dict:
    """The slide summary, pure over the stages' outputs: the records, the tally, the scale found and the
    stain map's description (None: not normalised)."""
    names = bundle.class_names
    counts = {c: 0 for c in names}
    for r in records:
        counts[r["class"]] = counts.get(r["class"], 0) + 1
    in_diff = [c for c in names if c not in policy.not_in_differential]
    n_diff = sum(counts[c] for c in in_diff)
    differential = {c: round(counts[c] / n_diff, 4) for c in in_diff} if n_diff else {}
    abnormal = [r for r in records if r["flags"].get("abnormal")]
    uncertain = [r for r in records if r["flags"].get("uncertain")]
    anomalous = [r for r in records if r["flags"].get("anomalous")]
    um = scale.um_per_px if scale else None
    flagged_classes: dict[str, int] = {}
    for r in abnormal:
        flagged_classes[r["class"]] = flagged_classes.get(r["class"], 0) + 1
    corrected = corrected_shares(records, names, list(bundle.abnormal_classes), policy.share_interval_resamples)
    level = triage(flagged_classes, len(records), n_diff, len(abnormal), len(uncertain), len(anomalous),
                   differential, policy, corrected["abnormal"] if corrected else None)
    not_assessed = sum(r["flags"].get("anomalous") is None for r in records)
    if not_assessed:  # a cell nobody checked for novelty is not a clean one
        level = {"level": "review" if level["level"] == "routine" else level["level"],
                 "reasons": [*level["reasons"], f"{not_assessed} cell{'s' if not_assessed > 1 else ''} not assessed "
                             "for anomaly (the reference estimator has no calibrated anomaly score)"]}
    domain = records_alarm(records, bundle.domain)
    if domain["raised"]:  # an urgent call from a model reading foreign cells is not one either
        level = {"level": "review", "reasons": ["cells unlike this model's training data; results unreliable "
                                                "until the site is adapted", *level["reasons"]]}
    out = {
        "source": tally.name,
        "width_px": tally.width,
        "height_px": tally.height,
        "scale": ({"um_per_px": round(um, 6), "source": scale.source,
                   "red_cell_diameter_px": round(scale.median_diameter_px, 2)} if scale else None),
        "stain": stain,
        "tiles": tally.tiles,
        "area_mm2": round(tally.area_px * (um or 0) ** 2 * 1e-6, 6),
        "counts": {"white_cells": len(records), "platelets": tally.platelets, "red_cells_estimated": tally.red_cells,
                   "anomaly_not_assessed": not_assessed},
        "by_class": counts,
        "differential": differential,
        "differential_classes": in_diff,  # the classes a differential counts (platelets are not), even when empty
        "corrected_shares": corrected,  # the shares corrected for the model's confusions (urgency reads them)
        "abnormal_cells": [_cell_ref(r) for r in abnormal],
        "uncertain_cells": [_cell_ref(r) for r in uncertain],
        "anomalous_cells": [_cell_ref(r) for r in anomalous],
        "triage": level,
        "domain_alarm": domain,
        "density_map": density_map(records, tally.width, tally.height, um or 1.0, bin_um) if um else None,
        "nfe_total": int(sum(r.get("nfe", 0) for r in records)),
    }
    if tally.failures:
        out["failures"] = tally.failures
    return out
