"""Slide sources: what a scanner or a camera produces, read as a stream of overlapping tiles
(runtime/source_tiles.py).

A source is a pixel plane of known size: a single field, a folder of fields, or a DICOM VL Whole
Slide Microscopy or VL microscopic image (runtime/dicom_source.py). ``open_source`` picks the right
one for a path; ``source_sha256`` is a slide's identity in audits and review exports.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.runtime.bundle import sha256_file
from cytoedge.runtime.cells import IMAGE_SUFFIXES, read_rgb
from cytoedge.runtime.dicom_source import DicomSlideSource, is_dicom
from cytoedge.runtime.errors import CytoedgeError, InputImageError
from cytoedge.runtime.limits import InputLimitError
from cytoedge.runtime.source_tiles import BACKGROUND, Opener, SlideSource, Tile, plain_open, tile_grid

log = logging.getLogger(__name__)


class ImageFieldSource:
    """One field from a PNG/JPEG/TIFF/BMP file. Read whole: a camera field is small (an image over
    MAX_FIELD_PIXELS is refused from its header, before it is decoded)."""

    def __init__(self, path: str | Path, um_per_px: float | None = None, read_path: str | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        try:
            self._rgb = read_rgb(read_path or self.path)
        except CytoedgeError as e:
            raise _named(e, read_path, self.name) from None
        self.height, self.width = self._rgb.shape[:2]
        self.um_per_px = um_per_px

    def tiles(self, tile_size: int, overlap: int) -> Iterator[Tile]:
        for core in tile_grid(self.width, self.height, tile_size):
            x0, y0 = max(core[0] - overlap, 0), max(core[1] - overlap, 0)
            x1, y1 = min(core[2] + overlap, self.width), min(core[3] + overlap, self.height)
            yield Tile(self._rgb[y0:y1, x0:x1], x0, y0, core, self.name)

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, bool]:
        """Pixels of a rectangle (background outside the field) and whether any lie in the field, as
        DicomSlideSource.read_region."""
        out = np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x1, self.width), min(y1, self.height)
        if xb <= xa or yb <= ya:
            return out, False
        out[ya - y0:yb - y0, xa - x0:xb - x0] = self._rgb[ya:yb, xa:xb]
        return out, True

    def close(self) -> None:
        self._rgb = np.zeros((0, 0, 3), np.uint8)


class FolderSource:
    """A folder of fields, scored as one slide: each field is its own plane (records name the field).

    A field that cannot be read is skipped and listed in ``failures`` (of the latest walk); a folder
    none of whose fields can be read is an InputImageError naming them."""

    def __init__(self, path: str | Path, um_per_px: float | None = None, opener: Opener | None = None):
        self.path = Path(path)
        self.name = str(self.path)
        self._opener = opener or plain_open
        self.files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InputImageError(f"{self.path}: folder holds no images {IMAGE_SUFFIXES}")
        self.um_per_px = um_per_px
        self.width = self.height = 0
        self.failures: list[dict] = []

    def tiles(self, tile_size: int, overlap: int) -> Iterator[Tile]:
        self.failures = []
        for path in self.files:
            try:
                with self._opener(path) as readable:
                    field = ImageFieldSource(path, self.um_per_px, readable)
            except (InputImageError, InputLimitError) as e:
                log.warning("%s", e)
                self.failures.append({"source": str(path), "error": str(e)})
                continue
            self.width, self.height = max(self.width, field.width), max(self.height, field.height)
            yield from field.tiles(tile_size, overlap)
        if self.files and len(self.failures) == len(self.files):
            shown = "; ".join(f["error"] for f in self.failures[:3])
            raise InputImageError(f"{self.path}: none of its {len(self.files)} fields could be read ({shown}"
                                  f"{'; …' if len(self.failures) > 3 else ''})")

    def close(self) -> None:
        self.files = []


def _named(error: CytoedgeError, read_path: str | None, name: str) -> CytoedgeError:
    """``error`` with the reader's path (a descriptor link) replaced by the input's name."""
    if not read_path or read_path == name:
        return error
    return type(error)(str(error).replace(read_path, name))


def open_source(path: str | Path, um_per_px: float | None = None, opener: Opener | None = None) -> SlideSource:
    """The right source for a path; InputImageError names the input when it cannot be read.

    ``um_per_px`` (the user's --um-per-px) overrides whatever the file says. ``opener`` opens each
    file read (the daemon's root guard: the file is read through a checked descriptor).
    """
    path = Path(path)
    opener = opener or plain_open
    if path.is_dir():
        return FolderSource(path, um_per_px, opener)
    if not path.exists():
        raise InputImageError(f"{path}: no such file or folder")
    with opener(path) as readable:
        if is_dicom(path, readable):
            source = DicomSlideSource(path, readable)
            if um_per_px:
                source.um_per_px = um_per_px
            return source
        return ImageFieldSource(path, um_per_px, readable)


def source_sha256(path: str | Path) -> str:
    """The slide's identity for review exports and audits: sha256 of the file's bytes, or for a folder of
    fields, sha256 over each image's relative path and its own sha256 (sorted)."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES):
        h.update(f"{p.relative_to(path).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()
