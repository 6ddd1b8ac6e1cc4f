"""Measure every class's denoising error under a list of probes, for labelled cells (calibration input)."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.estimator import Probe, error_source_for


def all_class_errors(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, probes: list[Probe],
                     noise: np.ndarray) -> np.ndarray:
    """``E [N, K, P]``: masked error of each class for each cell under each probe (no elimination);
    ``[N, K+1, P]`` where the network has a null class (its errors last)."""
    n, k = len(batch), bundle.num_class_ids
    source = error_source_for(batch, bundle, backend, probes, noise)
    cells = np.repeat(np.arange(n), k)
    classes = np.tile(np.arange(k), n)
    return np.stack([source(cells, classes, j).reshape(n, k) for j in range(len(probes))], axis=2)
