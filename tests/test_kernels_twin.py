"""The numpy twin of the preprocessing kernels against the contract, the OpenCV loop and the estimator."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cytoedge.kernels import CpuPreprocessor, add_noise, masked_weighted_error, prepare_batch, select_preprocessor
from cytoedge.kernels.cell_batch import ColourTransform, cell_table, prepare_batch_opencv_loop, sampling_matrix

COLOUR = ColourTransform(gain=(1.1, 0.9, 1.2), bias=(-0.03, 0.02, 0.05), mean=(0.6, 0.5, 0.45), std=(0.2, 0.25, 0.3))



def masked_error(eps_hat, noise, mask):
    """Independent float64 statement of the masked mean squared error per sample."""
    sq = (eps_hat.astype(np.float64) - noise.astype(np.float64)) ** 2
    return (sq * mask).sum(axis=(1, 2, 3)) / (mask.sum() * eps_hat.shape[1])


def smooth_tiles(rng: np.random.Generator, shapes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Blurred random fields: colour gradients of a few grey levels per pixel, like stained cells."""
    tiles = []
    for h, w in shapes:
        noise = rng.uniform(0, 255, (h, w, 3)).astype(np.float32)
        tiles.append(np.clip(cv2.GaussianBlur(noise, (0, 0), 3) * 4 - 384, 0, 255).astype(np.uint8))
    return tiles


def random_cells(rng: np.random.Generator, tiles: list[np.ndarray], n: int, margin: float) -> np.ndarray:
    """Cells anywhere within ``margin`` px of each tile (negative margin keeps them inside)."""
    idx = rng.integers(0, len(tiles), n)
    h = np.array([t.shape[0] for t in tiles])[idx]
    w = np.array([t.shape[1] for t in tiles])[idx]
    return cell_table(idx, rng.uniform(-margin, w - 1 + margin), rng.uniform(-margin, h - 1 + margin),
                      rng.uniform(0, 2 * np.pi, n), rng.random(n) < 0.5, rng.uniform(0.5, 1.6, n))


def contract_reference(tile: np.ndarray, cell: np.ndarray, size: int, colour: ColourTransform):
    """The module docstring of cell_batch, pixel by pixel in float64 (valid: all weighted taps inside)."""
    m = sampling_matrix(cell, size)
    h, w = tile.shape[:2]
    x = np.zeros((3, size, size))
    valid = np.zeros((size, size), np.uint8)
    for py in range(size):
        for px in range(size):
            qx, qy = m @ np.array([px, py, 1.0])
            x0, y0 = int(np.floor(qx)), int(np.floor(qy))
            fx, fy = qx - x0, qy - y0
            v = np.zeros(3)
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    if 0 <= x0 + dx < w and 0 <= y0 + dy < h:
                        v += wy * wx * tile[y0 + dy, x0 + dx]
            v = np.round(v)  # to the nearest grey level, half to even
            y = np.clip(v / 255 * np.array(colour.gain) + np.array(colour.bias), 0, 1)
            x[:, py, px] = (y - np.array(colour.mean)) / np.array(colour.std)
            valid[py, px] = 0 <= qx <= w - 1 and 0 <= qy <= h - 1
    return x, valid


def test_twin_matches_contract_pixel_by_pixel_at_borders(rng):
    tiles = smooth_tiles(rng, [(23, 31), (2, 3), (1, 1)])
    cells = np.concatenate([random_cells(rng, tiles, 12, margin=6.0),
                            cell_table([0, 0, 1, 2], [0.0, 30.0, 1.0, 0.0], [0.0, 22.0, 0.5, 0.0])])
    for size in (1, 7, 10):
        x, valid = prepare_batch(tiles, cells, size, COLOUR)
        for i, cell in enumerate(cells):
            ref_x, ref_valid = contract_reference(tiles[int(cell[0])], cell, size, COLOUR)
            # float32 coordinates move samples by ≤ 1e-4 px; on these tiles that is ≤ 1e-3 in output units
            np.testing.assert_allclose(x[i], ref_x, atol=2e-3, err_msg=f"cell {i}, size {size}")
            mismatch = valid[i] != ref_valid
            assert mismatch.sum() <= 1, f"cell {i}, size {size}: validity differs at {np.argwhere(mismatch)}"
    assert 0 < valid.mean() < 1


def test_twin_agrees_with_opencv_loop_within_fixed_point_error(rng):
    tiles = smooth_tiles(rng, [(96, 128), (75, 61)])
    cells = random_cells(rng, tiles, 64, margin=10.0)
    x_twin, v_twin = prepare_batch(tiles, cells, 33, COLOUR)
    x_cv, v_cv = prepare_batch_opencv_loop(tiles, cells, 33, COLOUR)
    # OpenCV's mask (nearest neighbour inside) also counts the half-pixel band around the tile
    assert not np.any((v_twin == 1) & (v_cv == 0))
    band = (v_cv == 1) & (v_twin == 0)
    assert band.mean() < 0.05
    # fixed-point coordinates (1/32 px) and uint8 rounding: ≤ 2 grey levels, ≤ 0.5 on average
    grey = (np.abs(x_twin - x_cv) * np.array(COLOUR.std)[None, :, None, None] / np.array(COLOUR.gain)[None, :, None, None]
            * 255).transpose(0, 2, 3, 1)[(v_twin == 1)]
    assert grey.max() <= 2.0 and grey.mean() <= 0.5, (grey.max(), grey.mean())


def test_twin_options_do_not_change_results(rng):
    tiles = smooth_tiles(rng, [(64, 64), (40, 90)])
    cells = random_cells(rng, tiles, 150, margin=5.0)
    x1, v1 = prepare_batch(tiles, cells, 32, COLOUR)
    threaded = CpuPreprocessor(threads=2, cells_per_chunk=7)
    x2, v2 = threaded.prepare_batch(tiles, cells, 32, COLOUR)
    threaded.close()
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(v1, v2)
    x16, v16 = prepare_batch(tiles, cells, 32, COLOUR, np.float16)
    assert x16.dtype == np.float16
    np.testing.assert_array_equal(x16, x1.astype(np.float16))
    np.testing.assert_array_equal(v16, v1)
    empty_x, empty_v = prepare_batch(tiles, cells[:0], 32, COLOUR)
    assert empty_x.shape == (0, 3, 32, 32) and empty_v.shape == (0, 32, 32)


@pytest.mark.parametrize("bad, message", [
    (dict(tiles=[np.zeros((4, 4, 3), np.float32)]), "tiles\\[0\\]"),
    (dict(tiles=np.zeros((4, 4, 3), np.uint8)), "list"),
    (dict(cells=np.zeros((2, 5))), "\\[N, 6\\]"),
    (dict(cells=cell_table([3], [1.0], [1.0])), "tile indices"),
    (dict(cells=cell_table([0], [np.nan], [1.0])), "NaN"),
    (dict(cells=cell_table([0], [1.0], [1.0], scale=0.0)), "scale"),
    (dict(out_size=0), "out_size"),
    (dict(colour=ColourTransform(std=(0.5, 0.0, 0.5))), "std"),
    (dict(dtype=np.float64), "dtype"),
])
def test_twin_refuses_bad_inputs_by_name(bad, message):
    args = dict(tiles=[np.zeros((4, 4, 3), np.uint8)], cells=cell_table([0], [1.0], [1.0]), out_size=8,
                colour=ColourTransform(), dtype=np.float32)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        prepare_batch(args["tiles"], args["cells"], args["out_size"], args["colour"], args["dtype"])


def test_add_noise_equals_the_schedule(bundle, rng):
    size = bundle.input_size
    x0 = rng.standard_normal((6, 3, size, size)).astype(np.float32)
    t = rng.integers(0, bundle.schedule.num_train_timesteps, 6)
    abar = bundle.schedule.alphas_cumprod[t]
    for noise in (rng.standard_normal((6, 3, size, size)).astype(np.float32),
                  rng.standard_normal((1, 3, size, size)).astype(np.float32)):
        expected = bundle.schedule.add_noise(x0, np.broadcast_to(noise, x0.shape), t)
        np.testing.assert_array_equal(add_noise(x0, noise, abar), expected)
    with pytest.raises(ValueError, match="alphas_cumprod_at_t"):
        add_noise(x0, x0, abar[:3])
    with pytest.raises(ValueError, match="noise"):
        add_noise(x0, x0[:2], abar)


def test_masked_weighted_error_equals_the_reference_estimator(bundle, rng):
    size = bundle.input_size
    eps_hat = rng.standard_normal((5, 3, size, size)).astype(np.float32)
    noise = rng.standard_normal((5, 3, size, size)).astype(np.float32)
    mask = bundle.loss_mask()
    weights = rng.uniform(0.5, 2.0, 5)
    expected = masked_error(eps_hat, noise, mask[None, None]) * weights
    np.testing.assert_allclose(masked_weighted_error(eps_hat, noise, mask[None, None], weights), expected, rtol=1e-6)
    shared = masked_weighted_error(eps_hat, noise[:1], mask, np.ones(5))
    np.testing.assert_allclose(shared, masked_error(eps_hat, np.broadcast_to(noise[:1], eps_hat.shape), mask[None, None]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        masked_weighted_error(eps_hat, noise, np.zeros_like(mask), weights)


def test_select_preprocessor_falls_back_to_the_twin_without_a_gpu():
    from cytoedge.kernels.cuda_runner import CudaUnavailable, cuda_device_available

    ok, why = cuda_device_available()
    if ok:
        pytest.skip(f"a GPU is present ({why}): the fallback is not taken")
    assert isinstance(select_preprocessor(), CpuPreprocessor)
    with pytest.raises(CudaUnavailable):
        select_preprocessor("cuda")
