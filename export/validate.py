"""Does an exported engine decide like the original? Numerical and decision-level checks.

The estimator is a parameter (``Classifier``: cells, bundle, backend → class ids), so the same check
runs with CytoDiffusion's reference protocol or with the fast calibrated estimator. Both draw their
noise from seeds, so two backends see identical probes and any disagreement is numerical.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.errors import CytoedgeError

log = logging.getLogger(__name__)

Classifier = Callable[[CellBatch, ModelBundle, DenoiserBackend], np.ndarray]

# A reduced-precision graph (FP16, INT8) may replace FP32 only where it decides like FP32 on at least
# this share of labelled cells (issue 6's bar for FP16, applied to every reduced precision).
DECISION_AGREEMENT_BAR = 0.995


def reference_classifier(n_trials: int = 40, seed: int = 0) -> Classifier:
    """CytoDiffusion's protocol with ``n_trials`` trials per cell and a fixed seed."""
    from cytoedge.runtime.reference_estimator import ReferenceSettings, classify_reference

    settings = ReferenceSettings(n_trials=n_trials, seed=seed)

    def classify(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend) -> np.ndarray:
        return classify_reference(batch, bundle, backend, settings).class_id

    return classify


def fast_classifier() -> Classifier:
    """The calibrated fast estimator (needs a bundle with calibration)."""
    from cytoedge.runtime.estimator import estimate

    def classify(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend) -> np.ndarray:
        return estimate(batch, bundle, backend).gaps.argmin(1)

    return classify


def classifier_by_name(name: str, n_trials: int = 40, seed: int = 0) -> Classifier:
    if name == "reference":
        return reference_classifier(n_trials, seed)
    if name == "fast":
        return fast_classifier()
    raise CytoedgeError(f"unknown estimator {name!r}; choose 'reference' or 'fast'")


@dataclass
class DecisionAgreement:
    cells: int
    agreeing: int
    class_a: np.ndarray
    class_b: np.ndarray

    @property
    def rate(self) -> float:
        return self.agreeing / self.cells if self.cells else float("nan")

    def to_dict(self) -> dict:
        return {"cells": self.cells, "agreeing": self.agreeing, "agreement": self.rate,
                "disagreeing_cells": np.flatnonzero(self.class_a != self.class_b).tolist()}


def decision_agreement(batch: CellBatch, bundle: ModelBundle, backend_a: DenoiserBackend,
                       backend_b: DenoiserBackend, classify: Classifier, chunk: int = 64) -> DecisionAgreement:
    """Classify ``batch`` with both backends (same estimator, same seeds) and count equal decisions."""
    if len(batch) == 0:
        raise CytoedgeError("decision agreement needs at least one cell")
    a, b = [], []
    for s in range(0, len(batch), chunk):
        part = batch.subset(np.arange(s, min(s + chunk, len(batch))))
        a.append(np.asarray(classify(part, bundle, backend_a)))
        b.append(np.asarray(classify(part, bundle, backend_b)))
        log.info("decision agreement: %d/%d cells", min(s + chunk, len(batch)), len(batch))
    ca, cb = np.concatenate(a), np.concatenate(b)
    return DecisionAgreement(len(ca), int((ca == cb).sum()), ca, cb)


def random_denoiser_inputs(batch: int, channels: int, size: int, num_classes: int, num_timesteps: int,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, channels, size, size)).astype(np.float32),
            rng.integers(0, num_timesteps, batch).astype(np.int64),
            rng.integers(0, num_classes, batch).astype(np.int64))


def max_abs_error(backend_a: DenoiserBackend, backend_b: DenoiserBackend, bundle: ModelBundle,
                  batch: int = 16, seed: int = 0) -> float:
    """Largest |ε̂_a − ε̂_b| over a seeded random batch."""
    x, t, c = random_denoiser_inputs(batch, *bundle.denoiser_shape, len(bundle.class_names),
                                     bundle.schedule.num_train_timesteps, seed)
    return float(np.abs(backend_a.predict_noise(x, t, c) - backend_b.predict_noise(x, t, c)).max())


def load_labelled_cells(root: Path, bundle: ModelBundle, per_class: int | None = None,
                        seed: int = 0) -> tuple[CellBatch, np.ndarray]:
    """Labelled crops ``root/<class>/*`` as a CellBatch (at most ``per_class`` per class, seeded)."""
    from cytoedge.runtime.cells import crops_to_batch, read_crop
    from cytoedge.runtime.labelled_data import list_labelled_files, stratified_subset

    files, labels, _ = list_labelled_files(Path(root), bundle.class_names)
    keep = stratified_subset(labels, per_class, seed)
    images = [read_crop(files[i]) for i in keep]
    return crops_to_batch(images, bundle), labels[keep]
