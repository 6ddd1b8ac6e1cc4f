"""Measure every class's denoising error under a list of probes, for labelled cells (calibration input)."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.estimator import DenoiserErrorSource, Probe


def all_class_errors(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, probes: list[Probe],
                     noise: np.ndarray) -> np.ndarray:
    """``E [N, K, P]``: masked error of each class for each cell under each probe (no elimination)."""
    n, k = len(batch), len(bundle.class_names)
    source = DenoiserErrorSource(batch, bundle, backend, probes, noise)
    cells = np.repeat(np.arange(n), k)
    classes = np.tile(np.arange(k), n)
    return np.stack([source(cells, classes, j).reshape(n, k) for j in range(len(probes))], axis=2)
