"""Tiles: the unit every slide source yields and every stage reads.

A source walks its pixel plane in raster order and yields :class:`Tile` s: a *core* rectangle (the
cores partition the plane) plus a margin of ``overlap`` pixels on every side, read from the
neighbours. A detector finds cells in the whole tile and keeps those whose centre lies in the core, so
a cell on a tile border is seen whole and counted exactly once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import numpy as np

# Opens a file to read and yields the path a reader should open (see plain_open, and the daemon's RootGuard).
Opener = Callable[[Path], ContextManager[str]]

BACKGROUND = 255  # value of pixels no frame covers (bright-field: empty glass is white)


@dataclass
class Tile:
    """RGB uint8 pixels of ``[y0, y0+h) × [x0, x0+w)`` in source pixels, and the core it owns."""

    rgb: np.ndarray
    x0: int
    y0: int
    core: tuple[int, int, int, int]  # x0, y0, x1, y1 in source pixels (end exclusive)
    field: str = ""

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether source-pixel points (centres of cells) fall in this tile's core."""
        cx0, cy0, cx1, cy1 = self.core
        return (x >= cx0) & (x < cx1) & (y >= cy0) & (y < cy1)


class SlideSource(Protocol):
    """A readable pixel plane. ``um_per_px`` is None where the file does not say."""

    name: str
    width: int
    height: int
    um_per_px: float | None

    def tiles(self, tile_size: int, overlap: int) -> Iterator[Tile]: ...

    def close(self) -> None: ...


def tile_grid(width: int, height: int, tile_size: int) -> Iterator[tuple[int, int, int, int]]:
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            yield x, y, min(x + tile_size, width), min(y + tile_size, height)


@contextlib.contextmanager
def plain_open(path: Path) -> Iterator[str]:
    """The opener outside the daemon: read the path as it is."""
    yield str(path)
