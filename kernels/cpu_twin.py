"""CPU twin of the CUDA preprocessing kernels: the same semantics, batched on OpenCV and numpy.

This is the path wherever there is no GPU, and the reference the CUDA source is checked against
(compiled for the CPU by ``emulated.py``). Semantics shared with ``cell_batch.cu``:

* Each cell's 2×3 affine (``cell_batch.sampling_matrix``: output pixel centre → tile coordinates,
  pixel centres at integer coordinates) is computed in float64 and rounded once to float32;
  ``q = a00·px + (a01·py + a02)`` (likewise y) per output pixel, in float32 (the row term first:
  it is shared by a whole output row).
* ``valid = 1`` iff ``0 ≤ qx ≤ W−1`` and ``0 ≤ qy ≤ H−1``: every tap with a non-zero weight is
  a real pixel. A sample partly outside (the half-pixel band around the tile) is still
  interpolated with zeros for the missing taps (``BORDER_CONSTANT`` 0) but has ``valid = 0``;
  samples further out are 0.
* Bilinear interpolation in float32, rounded to the nearest grey level (half to even), as
  OpenCV's uint8 ``remap`` does: the twin is one ``cv2.remap`` per tile over the maps of all its
  cells. The CUDA kernel's own float32 expression may differ from OpenCV's in the last bit, so a
  value lying within ~1e-5 of a half grey level can round the other way: the two agree exactly
  but for rare one-grey-level steps (the tests state that tolerance).
* Colour and normalisation are folded into one affine and clamp per channel:
  ``clamp(v·scale + offset, lo, hi)`` with ``scale = gain/(255·std)``, ``offset = (bias−mean)/std``,
  ``lo = −mean/std``, ``hi = (1−mean)/std`` — the contract's ``(clip(v/255·gain+bias, 0, 1)−mean)/std``
  up to float32 rounding. On an integer ``v`` that is a 256-entry table per channel (``cv2.LUT``).
  FP16 output rounds the float32 result to nearest even.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform

OUTPUT_DTYPES = (np.float32, np.float16)


def check_tiles(tiles: list[np.ndarray]) -> None:
    """Refuse anything but a non-empty list of RGB uint8 ``[H, W, 3]`` arrays."""
    if isinstance(tiles, np.ndarray) or not len(tiles):
        raise ValueError("tiles must be a non-empty list of RGB uint8 arrays [H, W, 3]")
    for i, tile in enumerate(tiles):
        if not isinstance(tile, np.ndarray) or tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[2] != 3:
            desc = f"{tile.dtype} {tile.shape}" if isinstance(tile, np.ndarray) else type(tile).__name__
            raise ValueError(f"tiles[{i}] must be an RGB uint8 array [H, W, 3], got {desc}")
        if tile.shape[0] < 1 or tile.shape[1] < 1:
            raise ValueError(f"tiles[{i}] is empty: shape {tile.shape}")


def check_cells(cells: np.ndarray, n_tiles: int) -> np.ndarray:
    """Return the cell table as float64 ``[N, 6]`` after checking shape, finiteness, tile ids, scale."""
    cells = np.asarray(cells, np.float64)
    if cells.ndim != 2 or cells.shape[1] != 6:
        raise ValueError(f"cells must be a [N, 6] table (tile, cx, cy, angle, flip, scale), got shape {cells.shape}")
    if not np.all(np.isfinite(cells)):
        raise ValueError("cells contain NaN or infinite values")
    tile = cells[:, 0]
    if np.any(tile != np.round(tile)) or np.any(tile < 0) or np.any(tile >= n_tiles):
        raise ValueError(f"cells[:, 0] must be integer tile indices in [0, {n_tiles - 1}]")
    if np.any(cells[:, 5] <= 0):
        raise ValueError("cells[:, 5] (scale) must be positive")
    return cells


def check_out_size(out_size: int) -> int:
    if isinstance(out_size, bool) or int(out_size) != out_size or out_size < 1:
        raise ValueError(f"out_size must be a positive integer, got {out_size!r}")
    return int(out_size)


def check_dtype(dtype: type) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in [np.dtype(d) for d in OUTPUT_DTYPES]:
        raise ValueError(f"dtype must be float32 or float16, got {dt}")
    return dt


def cell_affines(cells: np.ndarray, out_size: int) -> np.ndarray:
    """Per-cell sampling affines ``[N, 6] float32`` = (a00, a01, a02, a10, a11, a12), vectorised
    ``cell_batch.sampling_matrix``; computed in float64 and rounded once."""
    c = (out_size - 1) / 2.0
    angle, scale = cells[:, 3], cells[:, 5]
    mirror = np.where(cells[:, 4] != 0, -1.0, 1.0)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    a00, a01, a10, a11 = cos * mirror, -sin, sin * mirror, cos
    a02 = cells[:, 1] - (a00 + a01) * c
    a12 = cells[:, 2] - (a10 + a11) * c
    return np.stack([a00, a01, a02, a10, a11, a12], axis=1).astype(np.float32)


def colour_constants(colour: ColourTransform) -> np.ndarray:
    """``[4, 3] float32`` rows scale, offset, lo, hi of the folded colour transform (module docstring)."""
    gain, bias = np.asarray(colour.gain, np.float64), np.asarray(colour.bias, np.float64)
    mean, std = np.asarray(colour.mean, np.float64), np.asarray(colour.std, np.float64)
    for name, v in (("gain", gain), ("bias", bias), ("mean", mean), ("std", std)):
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise ValueError(f"colour.{name} must be three finite numbers, got {getattr(colour, name)!r}")
    if np.any(std <= 0):
        raise ValueError(f"colour.std must be positive, got {colour.std!r}")
    return np.stack([gain / (255.0 * std), (bias - mean) / std, -mean / std, (1.0 - mean) / std]).astype(np.float32)


@dataclass(frozen=True)
class KernelInputs:
    """Host arrays for ``cell_batch.cu``'s ``prepare_cells_*`` (the GPU runner and the g++ emulation):
    tiles unpadded and back to back, byte offsets, per-cell tile ids and float32 affines."""

    tiles: np.ndarray
    tile_offsets: np.ndarray
    tile_heights: np.ndarray
    tile_widths: np.ndarray
    cell_tiles: np.ndarray
    affines: np.ndarray
    colour: np.ndarray


def pack_tiles_for_kernel(tiles: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(flat uint8, byte offsets int64, heights int32, widths int32)`` of the tiles, unpadded."""
    check_tiles(tiles)
    sizes = np.array([t.size for t in tiles], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    flat = np.concatenate([np.ascontiguousarray(t).reshape(-1) for t in tiles])
    return (flat, offsets, np.array([t.shape[0] for t in tiles], np.int32),
            np.array([t.shape[1] for t in tiles], np.int32))


def kernel_inputs(tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                  colour: ColourTransform) -> KernelInputs:
    """Checked, laid-out inputs of one ``prepare_cells_*`` launch."""
    flat, offsets, heights, widths = pack_tiles_for_kernel(tiles)
    cells = check_cells(cells, len(tiles))
    size = check_out_size(out_size)
    return KernelInputs(flat, offsets, heights, widths, cells[:, 0].astype(np.int32),
                        np.ascontiguousarray(cell_affines(cells, size)), colour_constants(colour).reshape(-1))


def error_norm(mask: np.ndarray, eps_shape: tuple[int, ...]) -> tuple[np.ndarray, float]:
    """The mask as float32 ``[H*W]`` and ``1 / (Σ mask · C)`` for ``eps_hat`` of shape ``[B, C, H, W]``."""
    if len(eps_shape) != 4:
        raise ValueError(f"eps_hat must be [B, C, H, W], got shape {eps_shape}")
    mask = np.ascontiguousarray(mask, np.float32)
    if mask.size != eps_shape[2] * eps_shape[3]:
        raise ValueError(f"mask must hold H·W = {eps_shape[2] * eps_shape[3]} values, got shape {mask.shape}")
    total = float(mask.sum(dtype=np.float64))
    if not total > 0:
        raise ValueError("mask must have a positive sum")
    return mask.reshape(-1), 1.0 / (total * eps_shape[1])


def colour_lut(colour: ColourTransform) -> np.ndarray:
    """``[256, 3] float32``: the folded colour transform of every grey level, per channel."""
    scale, offset, lo, hi = colour_constants(colour)
    grey = np.arange(256, dtype=np.float32)[:, None]
    return np.minimum(np.maximum(grey * scale + offset, lo), hi)


def sampling_maps(affines: np.ndarray, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(qx, qy)`` float32 ``[N·S, S]``: every cell's source coordinates stacked (cv2.remap maps)."""
    grid = np.arange(out_size, dtype=np.float32)
    n = affines.shape[0]
    maps = []
    for row in (0, 3):
        q = np.empty((n, out_size, out_size), np.float32)
        row_term = np.multiply.outer(affines[:, row + 1], grid)
        row_term += affines[:, row + 2, None]
        np.add(np.multiply.outer(affines[:, row], grid)[:, None, :], row_term[:, :, None], out=q)
        maps.append(q.reshape(n * out_size, out_size))
    return maps[0], maps[1]


def _sample_rows(tile: np.ndarray, qx: np.ndarray, qy: np.ndarray, sampled: np.ndarray, inside: np.ndarray) -> None:
    """Resample ``tile`` at the stacked maps of some of its cells into ``sampled`` and ``inside`` (0/255)."""
    h, w = tile.shape[:2]
    cv2.remap(tile, qx, qy, cv2.INTER_LINEAR, dst=sampled, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    cv2.bitwise_and(cv2.inRange(qx, 0.0, float(w - 1)), cv2.inRange(qy, 0.0, float(h - 1)), dst=inside)


class CpuPreprocessor:
    """Batched preprocessing and estimator element-wise ops on the CPU (numpy), optionally over threads.

    The same interface as ``cuda_runner.CudaPreprocessor``: callers never know which one runs.
    """

    name = "cpu-twin"

    def __init__(self, threads: int = 1, cells_per_chunk: int = 64):
        if threads < 1 or cells_per_chunk < 1:
            raise ValueError(f"threads and cells_per_chunk must be >= 1, got {threads}, {cells_per_chunk}")
        self.threads, self.cells_per_chunk = int(threads), int(cells_per_chunk)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def prepare_batch(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                      colour: ColourTransform = ColourTransform(),
                      dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs for every cell: ``(x [N,3,S,S] dtype, valid [N,S,S] uint8)`` (module docstring).

        Cells are grouped by tile (a stable sort) so that each tile is resampled by whole runs of
        cells; results come back in the caller's order.
        """
        check_tiles(tiles)
        cells = check_cells(cells, len(tiles))
        size, dt = check_out_size(out_size), check_dtype(dtype)
        lut = np.ascontiguousarray(colour_lut(colour).T)
        n = cells.shape[0]
        if n == 0:
            return np.empty((0, 3, size, size), dt), np.empty((0, size, size), np.uint8)
        order = np.argsort(cells[:, 0], kind="stable")
        tile_of = cells[order, 0].astype(np.int64)
        qx, qy = sampling_maps(cell_affines(cells[order], size), size)
        sampled = np.empty((n * size, size, 4), np.uint8)
        inside = np.empty((n * size, size), np.uint8)
        # 4 channels: OpenCV's remap runs about twice as fast on RGBA as on RGB.
        rgba = {t: cv2.cvtColor(np.ascontiguousarray(tiles[t]), cv2.COLOR_RGB2RGBA) for t in np.unique(tile_of)}
        starts = np.searchsorted(tile_of, np.arange(len(tiles) + 1))
        jobs = [(t, lo, min(lo + self.cells_per_chunk, starts[t + 1]))
                for t in rgba for lo in range(starts[t], starts[t + 1], self.cells_per_chunk)]

        x = np.empty((n, 3, size, size), np.float32)

        def resample(job: tuple[int, int, int]) -> None:
            t, lo, hi = job
            rows = slice(lo * size, hi * size)
            _sample_rows(rgba[t], qx[rows], qy[rows], sampled[rows], inside[rows])

        dest = slice(None) if np.array_equal(order, np.arange(n)) else order  # back to the caller's order

        def colour_channel(c: int) -> None:
            x[dest, c] = cv2.LUT(cv2.extractChannel(sampled, c), lut[c]).reshape(n, size, size)

        self._map(resample, jobs)
        self._map(colour_channel, range(3))
        valid = np.empty((n, size, size), np.uint8)
        valid[dest] = inside.reshape(n, size, size)
        np.minimum(valid, 1, out=valid)  # inRange marks 255
        return (x if dt == np.float32 else x.astype(dt)), valid

    def _map(self, fn, items) -> None:
        """Run ``fn`` over ``items``: the pool takes every ``threads``-th item and the calling thread
        the rest (OpenCV and numpy release the GIL), or all inline without a pool."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            for item in items:
                fn(item)
            return
        offloaded = [self._pool.submit(fn, item) for i, item in enumerate(items) if i % self.threads]
        for item in items[::self.threads]:
            fn(item)
        for future in offloaded:
            future.result()

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray) -> np.ndarray:
        """Forward noising ``x_t = √ᾱ·x0 + √(1−ᾱ)·ε`` per sample (see module-level ``add_noise``)."""
        return add_noise(x0, noise, alphas_cumprod_at_t)

    def masked_weighted_error(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                              weights: np.ndarray) -> np.ndarray:
        """Per-sample weighted masked MSE (see module-level ``masked_weighted_error``)."""
        return masked_weighted_error(eps_hat, noise, mask, weights)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def check_noise_inputs(x0: np.ndarray, noise: np.ndarray, per_sample: np.ndarray,
                       per_sample_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``x [B, ...]``, ``noise [B or 1, ...]`` of the same sample shape, ``per_sample [B]``."""
    x0 = np.ascontiguousarray(x0, np.float32)
    noise = np.ascontiguousarray(noise, np.float32)
    per_sample = np.ascontiguousarray(per_sample, np.float32).reshape(-1)
    if x0.ndim < 1 or noise.shape[1:] != x0.shape[1:] or noise.shape[0] not in (1, x0.shape[0]):
        raise ValueError(f"noise must have shape [B or 1, ...] matching {x0.shape}, got {noise.shape}")
    if per_sample.shape[0] != x0.shape[0]:
        raise ValueError(f"{per_sample_name} must have one value per sample ({x0.shape[0]}), got {per_sample.shape[0]}")
    return x0, noise, per_sample


def check_alphas(abar: np.ndarray) -> None:
    if np.any(~(abar >= 0) | (abar > 1)):
        raise ValueError("alphas_cumprod_at_t must lie in [0, 1]")


def add_noise(x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray) -> np.ndarray:
    """Forward noising per sample: ``x_t = √ᾱ·x0 + √(1−ᾱ)·ε`` in float32.

    ``x0 [B, ...]``; ``noise`` the same shape or ``[1, ...]`` (one noise-bank draw shared by the
    batch); ``alphas_cumprod_at_t [B]`` = ᾱ at each sample's timestep (``schedule.alphas_cumprod[t]``).
    """
    x0, noise, abar = check_noise_inputs(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
    check_alphas(abar)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return np.sqrt(abar).reshape(shape) * x0 + np.sqrt(np.float32(1) - abar).reshape(shape) * noise


def masked_weighted_error(eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                          weights: np.ndarray) -> np.ndarray:
    """Per sample ``weight · Σ mask·(ε̂−ε)² / (Σ mask · C)`` → ``[B] float32``.

    ``eps_hat [B, C, H, W]``; ``noise`` the same or ``[1, C, H, W]``; ``mask`` ``[H, W]`` (any shape
    holding H·W values, e.g. ``bundle.loss_mask()[None, None]``); ``weights [B]`` (e.g. the
    timestep weight of each sample). Accumulated in float64.
    """
    eps_hat, noise, weights = check_noise_inputs(eps_hat, noise, weights, "weights")
    mask, inv_norm = error_norm(mask, eps_hat.shape)
    sq = np.square(eps_hat - noise, dtype=np.float32).astype(np.float64)
    err = sq.reshape(sq.shape[0], sq.shape[1], -1) @ mask.astype(np.float64)
    err = err.sum(axis=1) * inv_norm
    return (err * weights).astype(np.float32)


_DEFAULT = CpuPreprocessor()


def prepare_batch(tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                  colour: ColourTransform = ColourTransform(),
                  dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Single-threaded CPU twin of the ``prepare_cells`` kernel: ``(x [N,3,S,S], valid [N,S,S] uint8)``."""
    return _DEFAULT.prepare_batch(tiles, cells, out_size, colour, dtype)
