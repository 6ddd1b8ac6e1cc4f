"""The CUDA kernel sources without a GPU: PTX builds for sm_80/sm_90, and the same source compiled by
g++ through cuda_emulation.h, run over its grid, must equal the numpy twin.

Tolerance: 0 for the preprocessing kernel and noising (their float32 operations are specified one
by one, so the emulated CUDA and the twin must be bit-identical), relative 1e-5 for the error
reduction (float32 block reduction vs the twin's float64 sum).
"""
from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pytest

from cytoedge.kernels import add_noise, masked_weighted_error, prepare_batch
from cytoedge.kernels.cell_batch import ColourTransform, cell_table
from cytoedge.kernels.emulated import KERNEL_DIR, KERNEL_SOURCES, EmulatedKernels, EmulationUnavailable

ENTRY_POINTS = {"cell_batch.cu": ("prepare_cells_f32", "prepare_cells_f16"),
                "estimator_ops.cu": ("add_noise_f32", "masked_weighted_error_f32")}
COLOUR = ColourTransform(gain=(1.2, 0.8, 1.0), bias=(0.04, -0.02, 0.0), mean=(0.7, 0.55, 0.4), std=(0.15, 0.3, 0.22))


@pytest.fixture(scope="module")
def emulated() -> EmulatedKernels:
    try:
        return EmulatedKernels()
    except EmulationUnavailable as why:
        pytest.skip(f"no C++ compiler for the emulated kernels: {why}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_kernels_compile_to_ptx(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: PTX build not checked")
    out = tmp_path / f"{source}.{arch}.ptx"
    result = subprocess.run([nvcc, "-ptx", f"-arch={arch}", str(KERNEL_DIR / source), "-o", str(out)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    ptx = out.read_text()
    for entry in ENTRY_POINTS[source]:
        assert f".entry {entry}(" in ptx
    if source == "cell_batch.cu":
        # the sampling arithmetic must stay unfused to match the twin bit for bit
        assert "fma.rn.f32" not in ptx


def field_tiles(rng: np.random.Generator) -> list[np.ndarray]:
    """Odd-sized tiles from 1×1 up, smooth content with sharp edges."""
    tiles = []
    for h, w in [(1, 1), (2, 3), (17, 5), (61, 47), (128, 96)]:
        base = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 2) * 3 - 250
        tiles.append(np.clip(base, 0, 255).astype(np.uint8))
    return tiles


def edge_cells(rng: np.random.Generator, tiles: list[np.ndarray], n: int) -> np.ndarray:
    """Random cells around every tile, plus cells centred exactly on corners and edges."""
    idx = rng.integers(0, len(tiles), n)
    h = np.array([t.shape[0] for t in tiles], float)[idx]
    w = np.array([t.shape[1] for t in tiles], float)[idx]
    random = cell_table(idx, rng.uniform(-8, w + 7), rng.uniform(-8, h + 7), rng.uniform(0, 2 * np.pi, n),
                        rng.random(n) < 0.5, rng.uniform(0.3, 2.5, n))
    t = len(tiles) - 1
    th, tw = tiles[t].shape[:2]
    corners = cell_table(t, [0, tw - 1, 0, tw - 1, tw / 2, -0.5, tw - 0.5], [0, 0, th - 1, th - 1, -0.5, th / 2, th / 2],
                         angle=[0, 0, np.pi / 2, np.pi, 0, -np.pi / 4, 3.0], flip=[0, 1, 0, 1, 0, 1, 0])
    return np.concatenate([random, corners])


def assert_equal_up_to_rounding_ties(x_emu: np.ndarray, x_twin: np.ndarray, colour: ColourTransform) -> None:
    """Equal, but for bilinear values within float32 rounding of a half grey level, which the CUDA
    expression and OpenCV's may round apart: those differ by exactly one grey step, and are rare."""
    differ = x_emu != x_twin
    assert differ.mean() <= 1e-4, f"{differ.sum()} of {differ.size} values differ"
    step = np.asarray(colour.gain) / (255 * np.asarray(colour.std))
    for c in range(3):
        delta = np.abs(x_emu[:, c].astype(np.float64) - x_twin[:, c])[differ[:, c]]
        rtol = 2e-3 if x_twin.dtype == np.float32 else 1e-2  # both sides rounded to float16
        np.testing.assert_allclose(delta, step[c], rtol=rtol, err_msg=f"channel {c}: not one grey step")


@pytest.mark.parametrize("size", [1, 8, 17, 32, 33])
def test_emulated_prepare_kernel_equals_twin(emulated, rng, size):
    tiles = field_tiles(rng)
    cells = edge_cells(rng, tiles, 60)
    for dtype in (np.float32, np.float16):
        x_twin, v_twin = prepare_batch(tiles, cells, size, COLOUR, dtype)
        x_emu, v_emu = emulated.prepare_batch(tiles, cells, size, COLOUR, dtype)
        assert x_emu.dtype == dtype
        np.testing.assert_array_equal(v_emu, v_twin)
        assert_equal_up_to_rounding_ties(x_emu, x_twin, COLOUR)
    assert 0 < v_twin.mean() < 1  # the batch really straddles tile borders


def test_emulated_prepare_kernel_with_cells_striding_the_grid(emulated, rng):
    tiles = field_tiles(rng)
    cells = edge_cells(rng, tiles, 20)
    # grid.z smaller than the batch: each block loops over cells; block not a divisor of the size
    x_emu, v_emu = emulated.prepare_batch(tiles, cells, 19, COLOUR, block=(8, 4), max_grid_z=3)
    x_twin, v_twin = prepare_batch(tiles, cells, 19, COLOUR)
    assert_equal_up_to_rounding_ties(x_emu, x_twin, COLOUR)
    np.testing.assert_array_equal(v_emu, v_twin)


def test_emulated_half_conversion_rounds_like_numpy(emulated, rng):
    values = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 20000),
        np.array([0.0, -0.0, 65504, 65519.99, 65520, -70000, 1e-8, 2.98e-8, 5.96e-8, 6.1e-5, np.inf, -np.inf],
                 np.float32),
    ]).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(emulated.float_to_half(values).view(np.uint16), expected.view(np.uint16))


def test_emulated_add_noise_equals_twin(emulated, rng):
    x0 = rng.standard_normal((7, 3, 9, 9)).astype(np.float32)
    abar = rng.uniform(0.0, 1.0, 7).astype(np.float32)
    for noise in (rng.standard_normal((7, 3, 9, 9)).astype(np.float32), rng.standard_normal((1, 3, 9, 9)).astype(np.float32)):
        np.testing.assert_array_equal(emulated.add_noise(x0, noise, abar, block=64, grid=5), add_noise(x0, noise, abar))


@pytest.mark.parametrize("block, grid", [(256, None), (32, 3), (1, None)])
def test_emulated_error_reduction_equals_twin(emulated, rng, block, grid):
    eps_hat = rng.standard_normal((6, 3, 15, 15)).astype(np.float32)
    noise = rng.standard_normal((6, 3, 15, 15)).astype(np.float32)
    mask = (rng.random((15, 15)) < 0.7).astype(np.float32)
    weights = rng.uniform(0.1, 3.0, 6)
    for n in (noise, noise[:1]):
        got = emulated.masked_weighted_error(eps_hat, n, mask, weights, block=block, grid=grid)
        np.testing.assert_allclose(got, masked_weighted_error(eps_hat, n, mask, weights), rtol=1e-5)
