"""DICOM slide sources: a VL Whole Slide Microscopy image or a VL microscopic image, read frame by frame.

Frames are found and decoded one at a time by highdicom's ImageFileReader (offset tables, fragments)
over pydicom's decoders; only the frames a tile touches are decoded (a small LRU cache of frames), so
memory is bounded by the tile size, not the slide. See DicomSlideSource for focal planes and optical
paths.

Longer than most modules (about 440 lines) because it is one reader: the header checks that refuse a
file by name (SOP class, syntax, sizes, organisation), the frame geometry of TILED_FULL and
TILED_SPARSE, the focal-plane and optical-path choice, and the frame cache belong to one object and
are tested together (tests/test_dicom_sources.py).
"""
from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.runtime.errors import InputImageError
from cytoedge.runtime.limits import MAX_DICOM_SIDE_PX, MAX_FIELD_PIXELS, InputLimitError
from cytoedge.runtime.source_tiles import BACKGROUND, Tile, tile_grid

log = logging.getLogger(__name__)

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
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}  # each is read when pydicom has a decoder plugin for it here (DicomSlideSource says which is missing)
FRAME_CACHE = 64  # decoded frames kept; a raster walk reuses each at most a tile row later


class _NoColourManagementNotice(logging.Filter):
    """highdicom's reader looks for an ICC profile for its colour correction and warns when there is
    none (or several optical paths to take one from); the sources never correct colour (frames are
    read as stored) and say themselves which optical path they read, so these warnings are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "ICC Profile" not in message and "more than one optical path" not in message


logging.getLogger("highdicom.io").addFilter(_NoColourManagementNotice())


class DicomSlideSource:
    """A DICOM VL Whole Slide Microscopy image (TILED_FULL or TILED_SPARSE) or a VL microscopic image.

    Frames are read one at a time through highdicom's ``ImageFileReader``: it parses the header once,
    finds each frame from the Extended Offset Table, the Basic Offset Table or, where that table is
    empty, the fragments' item headers (a frame split into several fragments included), and decodes
    the frame with pydicom's decoders (native, JPEG, JPEG 2000, JPEG-LS, RLE: whatever pydicom has a
    plugin for here; a syntax it cannot decode is refused by name when the file is opened). A small
    LRU cache keeps decoded frames; the total pixel matrix is assembled only tile by tile. Colour is
    read as stored (no ICC correction).

    Focal planes and optical paths: one plane of the image is read, never a mix.
    - Focal planes (Z): the middle plane of the stack (for an even count, the lower of the two middle
      ones), where scanners put the plane their autofocus found.
    - Optical paths: the first one listed in the Optical Path Sequence (a bright-field smear has one).
    ``plane`` records the choice (``focal_planes``, ``focal_plane_index``, ``z_um``, ``optical_paths``,
    ``optical_path``, ``frames_read``, ``frames_skipped``); frames of other planes are skipped with a
    warning naming the file. TILED_FULL frames are ordered as the standard lays them out (columns,
    rows, then focal planes, then optical paths); TILED_SPARSE frames are placed by their per-frame
    plane position, Z offset and optical path. A frame off the frame grid or outside the matrix, two
    frames at one place of a plane, or a frame count the focal planes and optical paths do not
    account for are refused by name.
    """

    def __init__(self, path: str | Path, read_path: str | None = None):
        import pydicom
        from pydicom.errors import InvalidDicomError

        self.path = Path(path)
        self.name = str(self.path)
        self._read = str(read_path or self.path)  # what is opened: a checked descriptor's link in the daemon
        try:  # a first look at the few attributes that bound what the frame reader will build
            head = pydicom.dcmread(self._read, stop_before_pixels=True, specific_tags=list(_HEAD_TAGS))
        except (InvalidDicomError, OSError, EOFError, ValueError, struct.error) as e:
            raise InputImageError(f"{self.path}: not a readable DICOM file ({self._said(e)})") from None
        sop = str(head.get("SOPClassUID", "") or head.file_meta.get("MediaStorageSOPClassUID", ""))
        if sop != WSI_SOP_CLASS and sop not in VL_MICROSCOPIC_SOP_CLASSES:
            raise InputImageError(f"{self.path}: DICOM SOP class {sop or '(none)'} is not a slide "
                                  "(VL Whole Slide Microscopy or VL Microscopic Image expected)")
        self._tsuid = str(head.file_meta.get("TransferSyntaxUID", ""))
        self._check_syntax()
        for keyword in ("SamplesPerPixel", "BitsAllocated"):
            if head.get(keyword) in (None, ""):
                raise InputImageError(f"{self.path}: DICOM attribute {keyword} is missing")
        if int(head.SamplesPerPixel) not in (1, 3) or int(head.BitsAllocated) != 8:
            raise InputImageError(f"{self.path}: only 8-bit grey or colour pixels are supported")
        self.frame_rows, self.frame_cols = self._size(head, "Rows"), self._size(head, "Columns")
        if self.frame_rows * self.frame_cols > MAX_FIELD_PIXELS:  # a frame is decoded whole, as a field is
            raise InputLimitError(f"{self.path}: DICOM frames of {self.frame_cols}×{self.frame_rows} px are over "
                                  f"the {MAX_FIELD_PIXELS:,}-pixel limit for one decoded image")
        self.n_frames = self._frame_count(head)
        self._reader = self._open_reader()
        try:
            ds = self._reader.metadata
            self._check_pixel_attributes(ds)
            is_wsi = sop == WSI_SOP_CLASS
            self.width = self._size(ds, "TotalPixelMatrixColumns", self.frame_cols) if is_wsi else self.frame_cols
            self.height = self._size(ds, "TotalPixelMatrixRows", self.frame_rows) if is_wsi else self.frame_rows
            self.um_per_px = _pixel_spacing_um(ds)
            self._check_last_frame(int(ds.SamplesPerPixel))
            # After the last frame is found: NumberOfFrames is checked against the pixel data the file holds.
            self.positions, self._grid, self.plane = self._frame_layout(ds, is_wsi)
        except BaseException:
            self._reader.close()
            raise
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _said(self, error: BaseException) -> str:
        """A library's message with the opened path (a descriptor link in the daemon) named as the input."""
        return str(error).replace(self._read, self.name) if self._read != self.name else str(error)

    def _check_syntax(self) -> None:
        from pydicom.pixels import get_decoder

        if self._tsuid in NATIVE_SYNTAXES:
            return
        if self._tsuid not in ENCAPSULATED_SYNTAXES:
            raise InputImageError(f"{self.path}: transfer syntax {self._tsuid or '(none)'} is not supported "
                                  f"(native little endian or "
                                  f"{', '.join(sorted(set(ENCAPSULATED_SYNTAXES.values())))})")
        decoder = get_decoder(self._tsuid)
        if not decoder.is_available:
            raise InputImageError(f"{self.path}: transfer syntax {self._tsuid} "
                                  f"({ENCAPSULATED_SYNTAXES[self._tsuid]}) needs a pydicom decoder plugin that "
                                  f"is not installed: {'; '.join(decoder.missing_dependencies)}")

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

    def _frame_count(self, head) -> int:
        """NumberOfFrames, at least 1 and no more than the file has bytes for (checked before the frame
        reader lays out one offset per frame)."""
        value = head.get("NumberOfFrames", 1)
        try:
            count = int(value if value not in (None, "") else 1)
        except (TypeError, ValueError):
            raise InputImageError(f"{self.path}: DICOM attribute NumberOfFrames is {value!r}, "
                                  "not a whole number") from None
        if count < 1:
            raise InputImageError(f"{self.path}: DICOM attribute NumberOfFrames is {count}; expected 1 or more")
        size = os.stat(self._read).st_size
        per_frame = (self.frame_rows * self.frame_cols * int(head.SamplesPerPixel)
                     if self._tsuid in NATIVE_SYNTAXES else 10)  # an encapsulated frame: an item header and data
        if count * per_frame > size:
            raise InputImageError(f"{self.path}: {count:,} frames of at least {per_frame:,} bytes do not fit in "
                                  f"the file's {size:,} bytes (truncated file)")
        return count

    def _open_reader(self):
        from highdicom.io import ImageFileReader

        reader = ImageFileReader(self._read)
        try:
            reader.open()
            reader.metadata  # parses the header and lays out where each frame is
        except (OSError, EOFError, ValueError, struct.error, AttributeError, KeyError) as e:  # a malformed header
            reader.close()
            raise InputImageError(f"{self.path}: pixel data cannot be split into frames ({self._said(e)})") from None
        return reader

    def _check_pixel_attributes(self, ds) -> None:
        required = ["PhotometricInterpretation", "BitsStored", "PixelRepresentation"]
        if int(ds.SamplesPerPixel) > 1:
            required.append("PlanarConfiguration")
        for keyword in required:
            if ds.get(keyword) in (None, ""):
                raise InputImageError(f"{self.path}: DICOM attribute {keyword} is missing")

    def _check_last_frame(self, samples: int) -> None:
        """Read the last frame's stored bytes (not decoded): a file cut short ends before it does."""
        last = self.n_frames - 1
        try:
            raw = self._reader.read_frame_raw(last)
        except EOFError:
            raise InputImageError(f"{self.path}: pixel data ends early (truncated file)") from None
        except (OSError, ValueError, struct.error) as e:
            raise InputImageError(f"{self.path}: frame {last + 1} cannot be read ({self._said(e)})") from None
        stride = self.frame_rows * self.frame_cols * samples
        if self._tsuid in NATIVE_SYNTAXES and len(raw) < stride:
            raise InputImageError(f"{self.path}: pixel data ends {stride - len(raw):,} bytes into its last frame "
                                  f"of {stride:,} (truncated file)")

    def _frame_layout(self, ds, is_wsi: bool) -> tuple[list[tuple[int, int]], dict[tuple[int, int], int], dict]:
        """Top-left (row, col) of each frame in total-matrix pixels (0-based), the frames of the plane that
        is read by position, and the record of which plane that is."""
        if not is_wsi:
            if self.n_frames != 1:
                raise InputImageError(f"{self.path}: multi-frame VL microscopic images are not supported")
            return [(0, 0)], {(0, 0): 0}, _plane_record([None], 0, [], None, 1, 0)
        organisation = str(ds.get("DimensionOrganizationType", "TILED_SPARSE"))
        listed = [str(item.get("OpticalPathIdentifier", "")) for item in ds.get("OpticalPathSequence", [])]
        if organisation == "TILED_FULL":
            return self._tiled_full(ds, listed)
        return self._tiled_sparse(ds, listed)

    def _tiled_full(self, ds, listed: list[str]):
        cols, rows = -(-self.width // self.frame_cols), -(-self.height // self.frame_rows)
        tiles = rows * cols
        planes = _whole(ds.get("TotalPixelMatrixFocalPlanes", 1), 1)
        paths = _whole(ds.get("NumberOfOpticalPaths", len(listed) or 1), 1)
        if self.n_frames != tiles * planes * paths:
            raise InputImageError(f"{self.path}: TILED_FULL with {self.n_frames} frames, where a {cols}×{rows} "
                                  f"grid × {planes} focal plane(s) (TotalPixelMatrixFocalPlanes) × {paths} "
                                  f"optical path(s) (NumberOfOpticalPaths) needs {tiles * planes * paths}")
        z_index = (planes - 1) // 2
        first = z_index * tiles  # frames run columns, rows, focal planes, optical paths (optical path 1 here)
        positions = [((t // cols) * self.frame_rows, (t % cols) * self.frame_cols)
                     for t in range(tiles)] * (planes * paths)
        grid = {positions[k]: k for k in range(first, first + tiles)}
        origin_z = _z_um(ds.get("TotalPixelMatrixOriginSequence"))
        spacing = _shared(ds, "PixelMeasuresSequence", "SpacingBetweenSlices")
        if origin_z is None or (planes > 1 and spacing is None):
            z_planes: list[float | None] = [None] * planes
        else:  # the origin's Z is in µm, Spacing Between Slices in mm
            z_planes = [round(origin_z + i * float(spacing or 0) * 1000.0, 4) for i in range(planes)]
        names = listed[:paths] + [str(i + 1) for i in range(len(listed), paths)] if listed or paths > 1 else []
        plane = _plane_record(z_planes, z_index, names, names[0] if names else None, tiles,
                              self.n_frames - tiles)
        self._say_plane(plane)
        return positions, grid, plane

    def _tiled_sparse(self, ds, listed: list[str]):
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != self.n_frames:
            raise InputImageError(f"{self.path}: TILED_SPARSE image without one per-frame functional group "
                                  "per frame")
        shared_path = _shared(ds, "OpticalPathIdentificationSequence", "OpticalPathIdentifier")
        shared_z = _z_um(_shared_item(ds, "PlanePositionSlideSequence"))
        positions, planes = [], []
        for k, item in enumerate(per_frame):
            try:
                pos = item.PlanePositionSlideSequence[0]
                row = int(pos.RowPositionInTotalImagePixelMatrix) - 1
                col = int(pos.ColumnPositionInTotalImagePixelMatrix) - 1
            except (AttributeError, IndexError, TypeError, ValueError):
                raise InputImageError(f"{self.path}: frame {k + 1} has no plane position") from None
            if row % self.frame_rows or col % self.frame_cols:
                raise InputImageError(f"{self.path}: frame {k + 1} is at row {row + 1}, column {col + 1}, off the "
                                      f"{self.frame_cols}×{self.frame_rows} frame grid (overlapping or shifted "
                                      "frames are not supported)")
            if not (0 <= row < self.height and 0 <= col < self.width):
                raise InputImageError(f"{self.path}: frame {k + 1} is at row {row + 1}, column {col + 1}, outside "
                                      f"the {self.width}×{self.height} total pixel matrix")
            z = _z_um(pos)
            path_id = _item_value(item, "OpticalPathIdentificationSequence", "OpticalPathIdentifier")
            positions.append((row, col))
            planes.append((shared_z if z is None else z, str(path_id if path_id is not None else shared_path or "")))
        present = list(dict.fromkeys(p for _, p in planes))
        path = next((p for p in listed if p in present), present[0])
        z_planes = sorted({z for z, p in planes if p == path}, key=lambda z: (z is None, z))
        z_index = (len(z_planes) - 1) // 2
        chosen = (z_planes[z_index], path)
        grid: dict[tuple[int, int], int] = {}
        for k, key in enumerate(planes):
            if key != chosen:
                continue
            if positions[k] in grid:
                raise InputImageError(f"{self.path}: frames {grid[positions[k]] + 1} and {k + 1} are both at row "
                                      f"{positions[k][0] + 1}, column {positions[k][1] + 1} of one focal plane and "
                                      "optical path")
            grid[positions[k]] = k
        names = [p for p in dict.fromkeys([p for p in listed if p in present] + present) if p]
        plane = _plane_record(z_planes, z_index, names, path or None, len(grid), self.n_frames - len(grid))
        self._say_plane(plane)
        return positions, grid, plane

    def _say_plane(self, plane: dict) -> None:
        if not plane["frames_skipped"]:
            return
        read = []
        if plane["focal_planes"] > 1:
            z = "" if plane["z_um"] is None else f" at Z {plane['z_um']:g} µm"
            read.append(f"focal plane {plane['focal_plane_index'] + 1} of {plane['focal_planes']}{z} (the middle "
                        "of the stack)")
        if len(plane["optical_paths"]) > 1:
            read.append(f"optical path {plane['optical_path']!r} (the first of {len(plane['optical_paths'])})")
        log.warning("%s: reading %s only: %d frames read, %d frames of other planes skipped", self.name,
                    " on ".join(read), plane["frames_read"], plane["frames_skipped"])

    def frame(self, k: int) -> np.ndarray:
        """Frame ``k`` (0-based, in the file) as RGB uint8, read and decoded on its own."""
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        rgb = self._decode(k)
        self._cache[k] = rgb
        if len(self._cache) > FRAME_CACHE:
            self._cache.popitem(last=False)
        return rgb

    def _decode(self, k: int) -> np.ndarray:
        try:
            arr = self._reader.read_frame(k, correct_color=False)
        except (ValueError, RuntimeError, NotImplementedError, OSError, EOFError, struct.error) as e:
            raise InputImageError(f"{self.path}: frame {k + 1} cannot be decoded ({self._said(e)})") from None
        arr = np.asarray(arr)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape != (self.frame_rows, self.frame_cols, 3):
            raise InputImageError(f"{self.path}: frame {k + 1} decodes to {arr.shape}, not "
                                  f"{self.frame_rows}×{self.frame_cols} RGB")
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
        for core in tile_grid(self.width, self.height, step):
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

    def identifiers(self) -> dict:
        """The header's patient, study and specimen identifiers (runtime/privacy.py): read only when
        ``--include-identifiers`` asks for them in the results; nothing else of the source keeps them."""
        from cytoedge.runtime.privacy import header_identifiers

        return header_identifiers(self._reader.metadata)

    def close(self) -> None:
        self._cache.clear()
        self._reader.close()


# Read before the frame reader is opened: what bounds the offsets it lays out, and what refuses a non-slide.
_HEAD_TAGS = ("SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames")


def _whole(value, default: int) -> int:
    try:
        return max(int(value), 1)
    except (TypeError, ValueError):
        return default


def _shared_item(ds, sequence: str):
    """The first item of ``sequence`` in the shared functional groups, or None."""
    try:
        return ds.SharedFunctionalGroupsSequence[0][sequence].value[0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _item_value(item, sequence: str, keyword: str):
    try:
        return item[sequence].value[0].get(keyword)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def _shared(ds, sequence: str, keyword: str):
    found = _shared_item(ds, sequence)
    return None if found is None else found.get(keyword)


def _z_um(position) -> float | None:
    """Z Offset in Slide Coordinate System (µm) of a plane-position or origin item (a sequence is read
    at its first item), or None."""
    if position is not None and not hasattr(position, "get"):
        position = position[0] if len(position) else None
    value = None if position is None else position.get("ZOffsetInSlideCoordinateSystem")
    try:
        return round(float(value), 4)
    except (TypeError, ValueError):
        return None


def _plane_record(z_planes: list, z_index: int, optical_paths: list[str], optical_path: str | None,
                  read: int, skipped: int) -> dict:
    return {"focal_planes": len(z_planes), "focal_plane_index": z_index, "z_um": z_planes[z_index],
            "optical_paths": optical_paths, "optical_path": optical_path, "frames_read": read,
            "frames_skipped": skipped}


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
