"""CPU twin of the CUDA preprocessing kernels: the same arithmetic, vectorised in numpy.

This is the path wherever there is no GPU, and the reference the CUDA source is checked against
(compiled for the CPU by ``emulated.py``). Sampling semantics, shared bit for bit with
``cell_batch.cu`` (all arithmetic in float32, rounded after every operation, no fused multiply-add):

* Each cell's 2×3 affine (``cell_batch.sampling_matrix``: output pixel centre → tile coordinates,
  pixel centres at integer coordinates) is computed in float64 and rounded once to float32;
  ``q = (a00·px + a01·py) + a02`` (likewise y) per output pixel.
* ``valid = 1`` iff ``0 ≤ qx ≤ W−1`` and ``0 ≤ qy ≤ H−1``: every tap with a non-zero weight is
  a real pixel. A sample partly outside (the half-pixel band around the tile) is still
  interpolated with zeros for the missing taps (OpenCV's ``BORDER_CONSTANT`` 0) but has
  ``valid = 0``; samples further out are 0. (OpenCV's nearest-neighbour mask in the per-cell
  loop marks that band valid, so its mask is a superset of this one.)
* ``q`` is clamped to ``[−2, W]``×``[−2, H]`` (changes nothing inside, keeps indices finite),
  ``x0 = floor(qx)``, ``fx = qx − x0``; ``v = (1−fy)·((1−fx)·p00 + fx·p01) + fy·((1−fx)·p10 + fx·p11)``.
* Colour and normalisation are folded into one affine and clamp per channel:
  ``clamp(v·scale + offset, lo, hi)`` with ``scale = gain/(255·std)``, ``offset = (bias−mean)/std``,
  ``lo = −mean/std``, ``hi = (1−mean)/std`` — the contract's ``(clip(v/255·gain+bias, 0, 1)−mean)/std``
  up to float32 rounding. FP16 output rounds the float32 result to nearest even.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform

TILE_PAD = 2  # zero border of packed tiles: every tap of a clamped sample lands inside the buffer
OUTPUT_DTYPES = (np.float32, np.float16)


@dataclass(frozen=True)
class PackedTiles:
    """Tiles zero-padded by ``TILE_PAD`` and packed for gathers (built once per field, reused).

    ``pairs[i]`` holds pixel i and its right neighbour (6 RGB bytes in 8) of the padded tiles laid
    back to back, so one aligned 8-byte gather fetches two taps; ``offsets[i]`` is the pixel index
    of padded tile i's corner.
    """

    pairs: np.ndarray
    offsets: np.ndarray
    heights: np.ndarray
    widths: np.ndarray

    def __len__(self) -> int:
        return int(self.heights.shape[0])


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


def pack_tiles(tiles: list[np.ndarray] | PackedTiles) -> PackedTiles:
    """Pack tiles for the twin (a no-op for an already packed set)."""
    if isinstance(tiles, PackedTiles):
        return tiles
    check_tiles(tiles)
    heights = np.array([t.shape[0] for t in tiles], np.int64)
    widths = np.array([t.shape[1] for t in tiles], np.int64)
    padded = (heights + 2 * TILE_PAD) * (widths + 2 * TILE_PAD)
    offsets = np.concatenate([[0], np.cumsum(padded)[:-1]]).astype(np.int64)
    buffer = np.zeros(3 * int(padded.sum()) + 8, np.uint8)
    for tile, off, h, w in zip(tiles, offsets, heights, widths):
        view = buffer[3 * off:3 * (off + (h + 2 * TILE_PAD) * (w + 2 * TILE_PAD))]
        view.reshape(h + 2 * TILE_PAD, w + 2 * TILE_PAD, 3)[TILE_PAD:TILE_PAD + h, TILE_PAD:TILE_PAD + w] = tile
    pixels = buffer.shape[0] // 3 - 2
    pairs = np.ascontiguousarray(np.ndarray(shape=(pixels,), dtype=np.uint64, buffer=buffer, strides=(3,)))
    return PackedTiles(pairs, offsets, heights, widths)


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


@lru_cache(maxsize=8)
def _pixel_grid(out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel coordinates ``(px, py)`` as float32 ``[S*S]`` in row-major order."""
    grid = np.arange(out_size, dtype=np.float32)
    return np.tile(grid, out_size), np.repeat(grid, out_size)


def _sample_cells(packed: PackedTiles, tile_idx: np.ndarray, affines: np.ndarray, out_size: int,
                  consts: np.ndarray, out: np.ndarray, valid: np.ndarray) -> None:
    """Fill ``out [n,3,S*S]`` and ``valid [n,S*S]`` for one chunk of cells (float32, in-place ops)."""
    px, py = _pixel_grid(out_size)
    a = affines
    tmp = np.empty((a.shape[0], px.shape[0]), np.float32)
    qx = np.multiply(a[:, 0:1], px)
    qx += np.multiply(a[:, 1:2], py, out=tmp)
    qx += a[:, 2:3]
    qy = np.multiply(a[:, 3:4], px)
    qy += np.multiply(a[:, 4:5], py, out=tmp)
    qy += a[:, 5:6]
    wf = packed.widths[tile_idx][:, None].astype(np.float32)
    hf = packed.heights[tile_idx][:, None].astype(np.float32)
    np.logical_and(qx >= 0, qx <= wf - 1, out=valid)
    valid &= qy >= 0
    valid &= qy <= hf - 1
    np.minimum(np.maximum(qx, np.float32(-2), out=qx), wf, out=qx)
    np.minimum(np.maximum(qy, np.float32(-2), out=qy), hf, out=qy)
    x0, y0 = np.floor(qx), np.floor(qy)
    fx, fy = np.subtract(qx, x0, out=qx), np.subtract(qy, y0, out=qy)
    gx, gy = 1 - fx, 1 - fy
    row = (packed.widths[tile_idx] + 2 * TILE_PAD)[:, None]
    index = y0.astype(np.int64)
    index *= row
    index += x0.astype(np.int64)
    index += packed.offsets[tile_idx][:, None] + TILE_PAD * row + TILE_PAD
    n, m = index.shape
    taps = np.empty((4, 3, n, m), np.float32)  # (top-left, top-right, bottom-left, bottom-right) × RGB
    for half in range(2):
        pair_bytes = np.take(packed.pairs, index.reshape(-1)).view(np.uint8).reshape(n, m, 8)[..., :6]
        np.copyto(taps[2 * half:2 * half + 2], pair_bytes.reshape(n, m, 2, 3).transpose(2, 3, 0, 1), casting="unsafe")
        index += row
    scale, offset, lo, hi = (c[:, None, None] for c in consts)
    r0 = out.transpose(1, 0, 2)  # [3, n, S*S] view of this chunk's output
    np.multiply(gx, taps[0], out=r0)
    r0 += np.multiply(fx, taps[1], out=taps[1])
    r1 = np.multiply(gx, taps[2], out=taps[2])
    r1 += np.multiply(fx, taps[3], out=taps[3])
    r0 *= gy
    r1 *= fy
    r0 += r1
    r0 *= scale
    r0 += offset
    np.minimum(np.maximum(r0, lo, out=r0), hi, out=r0)


class CpuPreprocessor:
    """Batched preprocessing and estimator element-wise ops on the CPU (numpy), optionally over threads.

    The same interface as ``cuda_runner.CudaPreprocessor``: callers never know which one runs.
    """

    name = "cpu-twin"

    def __init__(self, threads: int = 1, cells_per_chunk: int = 32):
        if threads < 1 or cells_per_chunk < 1:
            raise ValueError(f"threads and cells_per_chunk must be >= 1, got {threads}, {cells_per_chunk}")
        self.threads, self.cells_per_chunk = int(threads), int(cells_per_chunk)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def prepare_batch(self, tiles: list[np.ndarray] | PackedTiles, cells: np.ndarray, out_size: int,
                      colour: ColourTransform = ColourTransform(),
                      dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Model inputs for every cell: ``(x [N,3,S,S] dtype, valid [N,S,S] uint8)`` (module docstring)."""
        packed = pack_tiles(tiles)
        cells = check_cells(cells, len(packed))
        size, dt = check_out_size(out_size), check_dtype(dtype)
        consts = colour_constants(colour)
        n = cells.shape[0]
        affines = cell_affines(cells, size)
        tile_idx = cells[:, 0].astype(np.int64)
        x = np.empty((n, 3, size * size), np.float32)
        valid = np.empty((n, size * size), np.bool_)
        chunks = [slice(i, min(i + self.cells_per_chunk, n)) for i in range(0, n, self.cells_per_chunk)]

        def run(s: slice) -> None:
            _sample_cells(packed, tile_idx[s], affines[s], size, consts, x[s], valid[s])

        if self._pool is not None and len(chunks) > 1:
            list(self._pool.map(run, chunks))
        else:
            for s in chunks:
                run(s)
        x = x.reshape(n, 3, size, size)
        return (x if dt == np.float32 else x.astype(dt)), valid.reshape(n, size, size).view(np.uint8)

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


def prepare_batch(tiles: list[np.ndarray] | PackedTiles, cells: np.ndarray, out_size: int,
                  colour: ColourTransform = ColourTransform(),
                  dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Single-threaded CPU twin of the ``prepare_cells`` kernel: ``(x [N,3,S,S], valid [N,S,S] uint8)``."""
    return _DEFAULT.prepare_batch(tiles, cells, out_size, colour, dtype)
