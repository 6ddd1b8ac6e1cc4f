"""Shared fixtures: the bundled model, its ONNX Runtime backend, small generated cell batches, and a
temporary run log for every test."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cytoedge.models import default_bundle_path
from cytoedge.runtime.bundle import ModelBundle

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def run_log_in_tmp(tmp_path_factory) -> Iterator[Path]:
    """Every `score` and `serve` of the tests (in process, or in a subprocess, which inherits the variable)
    logs to a temporary run log, never to the home folder's."""
    path = tmp_path_factory.mktemp("run-log") / "runlog.sqlite"
    before = os.environ.get("CYTOEDGE_RUN_LOG")
    os.environ["CYTOEDGE_RUN_LOG"] = str(path)
    yield path
    if before is None:
        del os.environ["CYTOEDGE_RUN_LOG"]
    else:
        os.environ["CYTOEDGE_RUN_LOG"] = before


@pytest.fixture(scope="session")
def bundle() -> ModelBundle:
    return ModelBundle.load(default_bundle_path())


@pytest.fixture(scope="session")
def ort_backend(bundle):
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle, threads=2)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def generated_cells(bundle, ort_backend) -> tuple[np.ndarray, np.ndarray]:
    """Two cells per class drawn by the bundled model itself (DDIM, few steps): RGB at model scale."""
    from cytoedge.runtime.sampler import ddim_sample

    labels = np.repeat(np.arange(len(bundle.class_names)), 2)
    return ddim_sample(bundle, ort_backend, labels, steps=12, seed=7), labels


@pytest.fixture(scope="session")
def generated_batch(generated_cells):
    """The generated cells as a CellBatch: each on its own reflect-padded tile, centred."""
    import cv2

    from cytoedge.kernels import cell_table
    from cytoedge.runtime.cells import CellBatch

    images, _ = generated_cells
    pad = images.shape[1] // 4
    tiles = [cv2.copyMakeBorder(im, pad, pad, pad, pad, cv2.BORDER_REFLECT_101) for im in images]
    centre = (tiles[0].shape[0] - 1) / 2.0
    return CellBatch(tiles, cell_table(np.arange(len(tiles)), np.full(len(tiles), centre), np.full(len(tiles), centre)))


@pytest.fixture(scope="session")
def crop_files(tmp_path_factory, bundle, generated_cells):
    """The generated cells written as crop files at the bundle's source scale (like PBC crops), each
    declaring its pixel size (PNG pHYs) as `cytoedge synth` writes it."""
    import cv2

    from cytoedge.runtime.cells import write_image_with_scale

    images, labels = generated_cells
    factor = float(bundle.manifest["input"].get("source_px_per_model_px", 1.0))
    folder = tmp_path_factory.mktemp("crops")
    paths = []
    for i, (im, y) in enumerate(zip(images, labels)):
        big = cv2.resize(im, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
        path = folder / f"cell{i:02d}_{bundle.class_names[y]}.png"
        write_image_with_scale(path, big, bundle.um_per_px / factor)
        paths.append(path)
    return paths


def _known_posteriors(labels: np.ndarray, means: np.ndarray, seed: int) -> np.ndarray:
    """Exact equal-prior posteriors ``[N, K]`` of cells drawn from a known model: one unit-variance feature
    per cell, class c centred on ``means[c]``; what a perfectly calibrated classifier would output."""
    x = np.random.default_rng(seed).normal(means[labels], 1.0)
    loglik = -0.5 * (x[:, None] - means[None]) ** 2
    p = np.exp(loglik - loglik.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.fixture(scope="session")
def known_posteriors():
    return _known_posteriors
