"""What a preprocessing kernel computes: cut model inputs for a batch of cells from field tiles.

For each cell ``(tile, cx, cy, angle, flip, scale)`` and each output pixel ``p`` (pixel centres at
integer coordinates, output centre ``c = (S-1)/2``) the source point is

    q = (cx, cy) + scale · R(angle) · F(flip) · (p − c),   F(flip) mirrors x when flip is set,

sampled bilinearly from the tile (RGB uint8) and rounded to the nearest grey level (half to even,
as OpenCV's uint8 resampling does); points outside the tile give 0 and a 0 in the validity mask. Then per channel ``y = clip(x/255 · gain + bias, 0, 1)`` (stain normalisation),
``(y − mean) / std`` (the bundle's normalisation), NCHW, float32 or float16.

This module holds the contract and a plain per-cell OpenCV loop (the baseline the batched
CPU twin and the CUDA kernels are measured and checked against).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

CELL_FIELDS = ("tile", "cx", "cy", "angle", "flip", "scale")


@dataclass(frozen=True)
class ColourTransform:
    """Per-channel affine on RGB in [0, 1] followed by the model's normalisation."""

    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def cell_table(tile: np.ndarray, cx: np.ndarray, cy: np.ndarray, angle: np.ndarray | float = 0.0,
               flip: np.ndarray | bool = False, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Stack per-cell parameters into the ``[N, 6] float64`` table the kernels take (CELL_FIELDS order)."""
    cx = np.asarray(cx, np.float64).reshape(-1)
    n = cx.shape[0]
    cols = [np.broadcast_to(np.asarray(v, np.float64), (n,)) for v in (tile, cx, cy, angle, flip, scale)]
    return np.stack(cols, axis=1)


def sampling_matrix(cell: np.ndarray, out_size: int) -> np.ndarray:
    """2×3 affine mapping output pixel coordinates to tile coordinates for one cell row."""
    _, cx, cy, angle, flip, scale = cell
    c = (out_size - 1) / 2.0
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    if flip:
        rot = rot @ np.diag([-1.0, 1.0])
    offset = np.array([cx, cy]) - rot @ np.array([c, c])
    return np.hstack([rot, offset[:, None]])


def prepare_batch_opencv_loop(tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                              colour: ColourTransform = ColourTransform(),
                              dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """One ``cv2.warpAffine`` per cell: returns ``(x [N,3,S,S], valid [N,S,S] uint8)``."""
    n = cells.shape[0]
    x = np.empty((n, 3, out_size, out_size), dtype=dtype)
    valid = np.empty((n, out_size, out_size), dtype=np.uint8)
    gain, bias = np.asarray(colour.gain, np.float32), np.asarray(colour.bias, np.float32)
    mean, std = np.asarray(colour.mean, np.float32), np.asarray(colour.std, np.float32)
    ones = None
    for i in range(n):
        tile = tiles[int(cells[i, 0])]
        m = sampling_matrix(cells[i], out_size)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        crop = cv2.warpAffine(tile, m, (out_size, out_size), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0).astype(np.float32)
        if ones is None or ones.shape != tile.shape[:2]:
            ones = np.full(tile.shape[:2], 255, np.uint8)
        inside = cv2.warpAffine(ones, m, (out_size, out_size), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        y = np.clip(crop / 255.0 * gain + bias, 0.0, 1.0)
        x[i] = ((y - mean) / std).transpose(2, 0, 1).astype(dtype)
        valid[i] = inside > 0
    return x, valid
