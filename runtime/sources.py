"""Slide sources: what a scanner or a camera produces, read as a stream of overlapping tiles.

A source is a pixel plane of known size (a single field, a folder of fields, a DICOM VL Whole
Slide Microscopy image, a DICOM VL microscopic image). ``tiles()`` walks it in raster order and
yields :class:`Tile` s: a *core* rectangle (the cores partition the plane) plus a margin of
``overlap`` pixels on every side, read from the neighbours. A detector finds cells in the whole
tile and keeps those whose centre lies in the core, so a cell on a tile border is seen whole and
counted exactly once. Only the frames a tile touches are decoded (a small LRU cache of frames), so
memory is bounded by the tile size, not the slide.

DICOM frames are located from the file once (native: fixed stride; encapsulated: item headers)
and each frame is decoded on its own through pydicom's pixel handlers.
"""
from __future__ import annotations

import contextlib
import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Protocol

import numpy as np

from cytoedge.runtime.cells import IMAGE_SUFFIXES, read_rgb
from cytoedge.runtime.errors import CytoedgeError, InputImageError
from cytoedge.runtime.limits import MAX_DICOM_SIDE_PX, MAX_FIELD_PIXELS, InputLimitError

log = logging.getLogger(__name__)

# Opens a file to read and yields the path a reader should open (see plain_open, and the daemon's RootGuard).
Opener = Callable[[Path], ContextManager[str]]

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
VL_MICROSCOPIC_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image",
}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
ENCAPSULATED_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
BACKGROUND = 255  # value of pixels no frame covers (bright-field: empty glass is white)
FRAME_CACHE = 64  # decoded frames kept; a raster walk reuses each at most a tile row later


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


def _tile_grid(width: int, height: int, tile_size: int) -> Iterator[tuple[int, int, int, int]]:
    for y in range(0, height, tile_size):
        for x in range(0, width, tile_size):
            yield x, y, min(x + tile_size, width), min(y + tile_size, height)


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
        for core in _tile_grid(self.width, self.height, tile_size):
            x0, y0 = max(core[0] - overlap, 0), max(core[1] - overlap, 0)
            x1, y1 = min(core[2] + overlap, self.width), min(core[3] + overlap, self.height)
            yield Tile(self._rgb[y0:y1, x0:x1], x0, y0, core, self.name)

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


@dataclass(frozen=True)
class _FrameIndex:
    """Where frame k's bytes are in the file: ``offsets[k]``, ``lengths[k]`` (fragments joined)."""

    offsets: list[list[int]]
    lengths: list[list[int]]


def _read_item_header(f, path: Path) -> tuple[int, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise InputImageError(f"{path}: pixel data ends early (truncated file)")
    group, elem, length = struct.unpack("<HHI", raw)
    return (group << 16) | elem, length


def _encapsulated_index(f, path: Path, start: int, n_frames: int) -> _FrameIndex:
    """Walk the item headers of encapsulated pixel data (no fragment is read)."""
    f.seek(start)
    tag, length = _read_item_header(f, path)
    if tag != 0xFFFEE000:
        raise InputImageError(f"{path}: encapsulated pixel data has no basic offset table item")
    bot = np.frombuffer(f.read(length), "<u4").astype(np.int64) if length else np.zeros(0, np.int64)
    first = f.tell()
    fragments: list[tuple[int, int]] = []
    size = f.seek(0, 2)
    f.seek(first)
    while True:
        tag, length = _read_item_header(f, path)
        if tag == 0xFFFEE0DD:
            break
        if tag != 0xFFFEE000 or f.tell() + length > size:
            raise InputImageError(f"{path}: pixel data fragment {len(fragments)} is damaged or truncated")
        fragments.append((f.tell(), length))
        f.seek(length, 1)
    if len(fragments) == n_frames:
        return _FrameIndex([[o] for o, _ in fragments], [[n] for _, n in fragments])
    if bot.size != n_frames:
        raise InputImageError(f"{path}: {len(fragments)} fragments for {n_frames} frames and no usable "
                              "basic offset table")
    offsets, lengths = [[] for _ in range(n_frames)], [[] for _ in range(n_frames)]
    frame_starts = first + bot
    for off, n in fragments:
        k = int(np.searchsorted(frame_starts, off - 8, side="right") - 1)
        offsets[k].append(off)
        lengths[k].append(n)
    return _FrameIndex(offsets, lengths)


def _pixel_data_start(path: Path, name: str, explicit_vr: bool) -> tuple[int, int]:
    """File offset of the Pixel Data value and its length (0xFFFFFFFF = encapsulated)."""
    import pydicom

    with open(path, "rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        pos = f.tell()
        head = f.read(12)
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        raise InputImageError(f"{name}: no pixel data element")
    if explicit_vr:
        return pos + 12, struct.unpack("<I", head[8:12])[0]
    return pos + 8, struct.unpack("<I", head[4:8])[0]


class DicomSlideSource:
    """A DICOM VL Whole Slide Microscopy image (TILED_FULL or TILED_SPARSE) or a VL microscopic image.

    Frames are read one at a time; the total pixel matrix is assembled only tile by tile.
    """

    def __init__(self, path: str | Path, read_path: str | None = None):
        import pydicom
        from pydicom.errors import InvalidDicomError

        self.path = Path(path)
        self.name = str(self.path)
        read = Path(read_path or self.path)  # what is opened: a checked descriptor's link in the daemon
        try:
            ds = pydicom.dcmread(read, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as e:
            raise InputImageError(f"{self.path}: not a readable DICOM file ({e})") from None
        sop = str(ds.get("SOPClassUID", ""))
        if sop != WSI_SOP_CLASS and sop not in VL_MICROSCOPIC_SOP_CLASSES:
            raise InputImageError(f"{self.path}: DICOM SOP class {sop or '(none)'} is not a slide "
                                  "(VL Whole Slide Microscopy or VL Microscopic Image expected)")
        tsuid = str(ds.file_meta.get("TransferSyntaxUID", ""))
        if tsuid not in NATIVE_SYNTAXES and tsuid not in ENCAPSULATED_SYNTAXES:
            raise InputImageError(f"{self.path}: transfer syntax {tsuid} is not supported (native little "
                                  f"endian or {', '.join(sorted(set(ENCAPSULATED_SYNTAXES.values())))})")
        if int(ds.get("SamplesPerPixel", 1)) not in (1, 3) or int(ds.get("BitsAllocated", 8)) != 8:
            raise InputImageError(f"{self.path}: only 8-bit grey or colour pixels are supported")
        self._ds = ds
        self._tsuid = tsuid
        self.frame_rows, self.frame_cols = self._size(ds, "Rows"), self._size(ds, "Columns")
        if self.frame_rows * self.frame_cols > MAX_FIELD_PIXELS:  # a frame is decoded whole, as a field is
            raise InputLimitError(f"{self.path}: DICOM frames of {self.frame_cols}×{self.frame_rows} px are over "
                                  f"the {MAX_FIELD_PIXELS:,}-pixel limit for one decoded image")
        self.n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        is_wsi = sop == WSI_SOP_CLASS
        self.width = self._size(ds, "TotalPixelMatrixColumns", self.frame_cols) if is_wsi else self.frame_cols
        self.height = self._size(ds, "TotalPixelMatrixRows", self.frame_rows) if is_wsi else self.frame_rows
        self.um_per_px = _pixel_spacing_um(ds)
        start, length = _pixel_data_start(read, self.name, tsuid != "1.2.840.10008.1.2")
        with open(read, "rb") as f:
            size = f.seek(0, 2)
            if tsuid in NATIVE_SYNTAXES:
                spp = int(ds.get("SamplesPerPixel", 1))
                stride = self.frame_rows * self.frame_cols * spp
                if start + stride * self.n_frames > size:
                    raise InputImageError(f"{self.path}: pixel data holds {size - start} bytes for "
                                          f"{self.n_frames} frames of {stride} (truncated file)")
                self._index = _FrameIndex([[start + k * stride] for k in range(self.n_frames)],
                                          [[stride]] * self.n_frames)
            else:
                if length != 0xFFFFFFFF:
                    raise InputImageError(f"{self.path}: compressed pixel data is not encapsulated")
                self._index = _encapsulated_index(f, self.path, start, self.n_frames)
        # After the index: it has checked NumberOfFrames against the pixel data the file really holds.
        self.positions = self._frame_positions(ds, is_wsi)
        self._grid = {(r, c): k for k, (r, c) in enumerate(self.positions)}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._file = open(read, "rb")

    def _size(self, ds, keyword: str, default: int | None = None) -> int:
        """A frame or total-matrix side from the header, 1 to MAX_DICOM_SIDE_PX (a zero would divide the
        frame grid by zero); InputImageError names the file and the attribute."""
        value = ds.get(keyword, default)
        if value is None or value == "":
            raise InputImageError(f"{self.path}: DICOM attribute {keyword} is missing")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise InputImageError(f"{self.path}: DICOM attribute {keyword} is {value!r}, not a whole number") from None
        if not 1 <= size <= MAX_DICOM_SIDE_PX:
            raise InputImageError(f"{self.path}: DICOM attribute {keyword} is {size}; expected 1 to "
                                  f"{MAX_DICOM_SIDE_PX:,}")
        return size

    def _frame_positions(self, ds, is_wsi: bool) -> list[tuple[int, int]]:
        """Top-left (row, col) of each frame in total-matrix pixels (0-based)."""
        if not is_wsi:
            if self.n_frames != 1:
                raise InputImageError(f"{self.path}: multi-frame VL microscopic images are not supported")
            return [(0, 0)]
        organisation = str(ds.get("DimensionOrganizationType", "TILED_SPARSE"))
        if organisation == "TILED_FULL":
            cols = -(-self.width // self.frame_cols)
            rows = -(-self.height // self.frame_rows)
            if self.n_frames < rows * cols:
                raise InputImageError(f"{self.path}: TILED_FULL with {self.n_frames} frames for a {cols}×{rows} "
                                      "grid (several focal planes/optical paths are not supported)")
            return [((k // cols) * self.frame_rows, (k % cols) * self.frame_cols) for k in range(rows * cols)]
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != self.n_frames:
            raise InputImageError(f"{self.path}: TILED_SPARSE image without one per-frame functional group "
                                  "per frame")
        positions = []
        for k, item in enumerate(per_frame):
            try:
                pos = item.PlanePositionSlideSequence[0]
                positions.append((int(pos.RowPositionInTotalImagePixelMatrix) - 1,
                                  int(pos.ColumnPositionInTotalImagePixelMatrix) - 1))
            except (AttributeError, IndexError):
                raise InputImageError(f"{self.path}: frame {k + 1} has no plane position") from None
        return positions

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` (0-based) as RGB uint8, decoded by pydicom on its own."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        rgb = self._decode(k)
        self._cache[k] = rgb
        if len(self._cache) > FRAME_CACHE:
            self._cache.popitem(last=False)
        return rgb

    def _decode(self, k: int) -> np.ndarray:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.encaps import encapsulate
        from pydicom.pixels import pixel_array

        parts = []
        for off, n in zip(self._index.offsets[k], self._index.lengths[k]):
            self._file.seek(off)
            parts.append(self._file.read(n))
        one = Dataset()
        one.file_meta = FileMetaDataset()
        one.file_meta.TransferSyntaxUID = self._tsuid
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                        "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration"):
            if keyword in self._ds:
                setattr(one, keyword, self._ds[keyword].value)
        one.NumberOfFrames = 1
        one.PixelData = parts[0] if self._tsuid in NATIVE_SYNTAXES else encapsulate([b"".join(parts)])
        try:
            arr = pixel_array(one, as_rgb=True)
        except (ValueError, RuntimeError, NotImplementedError, OSError) as e:
            raise InputImageError(f"{self.path}: frame {k + 1} cannot be decoded ({e})") from None
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        return arr.astype(np.uint8, copy=False)

    def read_region(self, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, bool]:
        """Pixels of a rectangle (background where no frame covers it) and whether any frame did."""
        out = np.full((y1 - y0, x1 - x0, 3), BACKGROUND, np.uint8)
        fr, fc = self.frame_rows, self.frame_cols
        covered = False
        for r in range((y0 // fr) * fr, y1, fr):
            for c in range((x0 // fc) * fc, x1, fc):
                k = self._grid.get((r, c))
                if k is None:
                    continue
                covered = True
                px = self.frame(k)
                ya, yb = max(y0, r), min(y1, r + fr, self.height)
                xa, xb = max(x0, c), min(x1, c + fc, self.width)
                out[ya - y0:yb - y0, xa - x0:xb - x0] = px[ya - r:yb - r, xa - c:xb - c]
        return out, covered

    def tiles(self, tile_size: int, overlap: int) -> Iterator[Tile]:
        """Tiles aligned to the frame grid where a tile holds whole frames (else smaller than a frame, as
        the scorer may ask at coarse scales); tiles whose core no frame covers are skipped."""
        step = (tile_size // self.frame_cols) * self.frame_cols or tile_size
        for core in _tile_grid(self.width, self.height, step):
            if not self._core_covered(core):
                continue
            x0, y0 = max(core[0] - overlap, 0), max(core[1] - overlap, 0)
            x1, y1 = min(core[2] + overlap, self.width), min(core[3] + overlap, self.height)
            rgb, _ = self.read_region(x0, y0, x1, y1)
            yield Tile(rgb, x0, y0, core, self.name)

    def _core_covered(self, core: tuple[int, int, int, int]) -> bool:
        fr, fc = self.frame_rows, self.frame_cols
        return any((r, c) in self._grid for r in range((core[1] // fr) * fr, core[3], fr)
                   for c in range((core[0] // fc) * fc, core[2], fc))

    def close(self) -> None:
        self._cache.clear()
        self._file.close()


def _pixel_spacing_um(ds) -> float | None:
    """Column spacing in µm from the shared functional groups or the top level (DICOM stores mm)."""
    spacing = None
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError):
        spacing = ds.get("PixelSpacing")
    try:
        um = float(spacing[1]) * 1000.0
    except (TypeError, ValueError, IndexError):  # absent, or not a row/column pair
        return None
    return um if um > 0 else None


def is_dicom(path: Path, read_path: str | None = None) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble (suffix is not required)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(read_path or path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@contextlib.contextmanager
def plain_open(path: Path) -> Iterator[str]:
    """The opener outside the daemon: read the path as it is."""
    yield str(path)


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
