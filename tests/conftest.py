"""Shared fixtures: the bundled model, its ONNX Runtime backend, and small generated cell batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cytoedge.models import default_bundle_path
from cytoedge.runtime.bundle import ModelBundle

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
