"""The pycuda runner on a real GPU against the CPU twin; skipped, with the reason, where there is none."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.kernels import add_noise, masked_weighted_error, prepare_batch, select_preprocessor
from cytoedge.kernels.cell_batch import ColourTransform, cell_table
from cytoedge.kernels.cuda_runner import CudaPreprocessor, cuda_device_available
from test_kernels_cuda_source import assert_equal_up_to_rounding_ties

COLOUR = ColourTransform(gain=(1.1, 0.95, 1.05), bias=(0.0, 0.01, -0.02), mean=(0.6, 0.5, 0.45), std=(0.2, 0.25, 0.3))


@pytest.fixture(scope="module")
def runner():
    ok, why = cuda_device_available()
    if not ok:
        print(f"pycuda runner not tested: {why}")
        pytest.skip(f"pycuda runner not tested: {why}")
    gpu = CudaPreprocessor()
    yield gpu
    gpu.close()


def tiles_and_cells(rng: np.random.Generator, n: int):
    tiles = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(1, 1), (37, 53), (256, 200)]]
    idx = rng.integers(0, len(tiles), n)
    h = np.array([t.shape[0] for t in tiles], float)[idx]
    w = np.array([t.shape[1] for t in tiles], float)[idx]
    cells = cell_table(idx, rng.uniform(-6, w + 5), rng.uniform(-6, h + 5), rng.uniform(0, 2 * np.pi, n),
                       rng.random(n) < 0.5, rng.uniform(0.4, 2.0, n))
    return tiles, cells


def test_gpu_prepare_equals_twin_across_reused_buffers(runner, rng):
    tiles, cells = tiles_and_cells(rng, 300)
    for n, size, dtype in [(300, 32, np.float32), (17, 33, np.float16), (300, 7, np.float32)]:
        x_gpu, v_gpu = runner.prepare_batch(tiles, cells[:n], size, COLOUR, dtype)
        x_cpu, v_cpu = prepare_batch(tiles, cells[:n], size, COLOUR, dtype)
        np.testing.assert_array_equal(v_gpu, v_cpu)
        # the emulated build of the same kernels already needs one-grey-step ties: so does the GPU's
        assert_equal_up_to_rounding_ties(x_gpu, x_cpu, COLOUR)


def test_gpu_estimator_ops_equal_twin(runner, rng):
    x0 = rng.standard_normal((40, 3, 32, 32)).astype(np.float32)
    noise = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    abar = rng.uniform(0, 1, 40).astype(np.float32)
    # sqrt and fused multiply-adds may round one float32 ulp apart on the device
    np.testing.assert_allclose(runner.add_noise(x0, noise, abar), add_noise(x0, noise, abar), rtol=1e-6, atol=1e-6)
    mask = (rng.random((32, 32)) < 0.6).astype(np.float32)
    weights = rng.uniform(0.5, 2, 40)
    np.testing.assert_allclose(runner.masked_weighted_error(x0, noise, mask, weights),
                               masked_weighted_error(x0, noise, mask, weights), rtol=1e-5)


def test_select_preprocessor_picks_the_gpu(runner):
    assert isinstance(select_preprocessor(), CudaPreprocessor)
