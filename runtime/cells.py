"""Cells as the estimators see them: field tiles at model scale plus a table of cell centres.

A single-cell crop is one tile with one cell at its centre; a smear field is one tile with many.
Reading and resampling (I/O and scale) happen here, at the edge; the estimators receive arrays.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from cytoedge.kernels import ColourTransform, prepare_batch
from cytoedge.kernels.cell_batch import cell_table
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import InputImageError
from cytoedge.runtime.limits import MAX_CROP_SIDE_PX, MAX_FIELD_PIXELS, UM_PER_PX_MAX, UM_PER_PX_MIN, InputLimitError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class CellBatch:
    """RGB uint8 tiles at the model's pixel scale and one row per cell (kernels' CELL_FIELDS).

    ``inputs`` cuts every cell of the batch in one view once and keeps the cut, so the estimator's
    probes and a flagged cell's heatmap read the same pixels without cutting them again."""

    tiles: list[np.ndarray]
    cells: np.ndarray
    _cuts: dict = field(default_factory=dict, repr=False, compare=False)
    cut_count: int = field(default=0, compare=False)  # cells cut by the kernels for this batch (all views)

    def __len__(self) -> int:
        return int(self.cells.shape[0])

    def subset(self, index: np.ndarray) -> "CellBatch":
        """The cells ``index`` on the same tiles, with their cuts so far."""
        return CellBatch(self.tiles, self.cells[index], {k: v[index] for k, v in self._cuts.items()})

    def rows_in_view(self, angle: float, flip: bool) -> np.ndarray:
        """The cell rows with every cell rotated by ``angle`` (and mirrored): one probe view of them all."""
        cells = self.cells.copy()
        cells[:, 3], cells[:, 4] = float(angle), float(flip)
        return cells

    def inputs(self, angle: float, flip: bool, bundle: ModelBundle, colour: ColourTransform | None = None) -> np.ndarray:
        """``[N, 3, S, S]`` model inputs of every cell rotated by ``angle`` (and mirrored), cut once per view."""
        colour = colour or bundle.colour_transform()
        key = (float(angle), bool(flip), colour, bundle.input_size)
        if key not in self._cuts:
            self._cuts[key] = model_inputs(self.tiles, self.rows_in_view(angle, flip), bundle, colour)
            self.cut_count += len(self)
        return self._cuts[key]


def model_inputs(tiles: list[np.ndarray], cells: np.ndarray, bundle: ModelBundle,
                 colour: ColourTransform | None = None) -> np.ndarray:
    """``[N, 3, S, S]`` model inputs of the cell rows ``cells``, cut by the kernels with the bundle's colour
    transform. A pixel the cut takes from beyond its tile (a cell at the slide's edge) is glass, white, as
    the slide would show it, not the kernels' black."""
    colour = colour or bundle.colour_transform()
    x, valid = prepare_batch(tiles, cells, bundle.input_size, colour)
    if valid.all():
        return x
    return np.where(valid[:, None] > 0, x, glass_values(colour, x.dtype)[None, :, None, None])


def glass_values(colour: ColourTransform, dtype: type = np.float32) -> np.ndarray:
    """``[3]``: white (glass) through ``colour``, the model input of a pixel beyond the tile (host and device
    loops fill with the same numbers)."""
    return ((np.clip(np.asarray(colour.gain) + np.asarray(colour.bias), 0.0, 1.0) - np.asarray(colour.mean))
            / np.asarray(colour.std)).astype(dtype)


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, nothing decoded (Pillow opens lazily), so a size limit
    is checked before the pixels are allocated; None where Pillow cannot identify the file (OpenCV may)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # cytoedge's own limits apply
        try:
            with Image.open(path) as im:
                return im.size
        except Image.DecompressionBombError:  # past twice Pillow's MAX_IMAGE_PIXELS, which it will not open
            raise InputLimitError(f"{path}: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels by its header, over "
                                  f"the {MAX_FIELD_PIXELS:,}-pixel limit for an image file; a slide this large "
                                  "needs a tiled format (DICOM VL Whole Slide Microscopy)") from None
        except (UnidentifiedImageError, OSError, ValueError):
            return None


def declared_um_per_px(path: str | Path) -> float | None:
    """The pixel size an image file declares (PNG pHYs in metres, TIFF/JPEG resolution in inches), if
    it is a microscope's: 72-300 dpi defaults of cameras and editors (85-350 µm/px) fall outside
    UM_PER_PX_MIN..UM_PER_PX_MAX and are ignored, as are unequal axes."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            dpi = im.info.get("dpi")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if not dpi or len(dpi) != 2 or not all(d and d > 0 for d in dpi):
        return None
    x, y = (25400.0 / float(d) for d in dpi)
    if abs(x - y) > 1e-3 * max(x, y) or not UM_PER_PX_MIN <= x <= UM_PER_PX_MAX:
        return None
    return x


def write_image_with_scale(path: str | Path, rgb: np.ndarray, um_per_px: float) -> None:
    """Write an RGB image (PNG/TIFF) that declares its pixel size, so a reader need not guess it."""
    from PIL import Image

    dpi = 25400.0 / um_per_px
    Image.fromarray(np.ascontiguousarray(rgb)).save(str(path), dpi=(dpi, dpi))


def _check_field_size(path: Path, width: int, height: int) -> None:
    if width * height > MAX_FIELD_PIXELS:
        raise InputLimitError(f"{path}: {width}×{height} px ({width * height:,} pixels) is over the "
                              f"{MAX_FIELD_PIXELS:,}-pixel limit for an image file, which is decoded whole; "
                              "a slide this large needs a tiled format (DICOM VL Whole Slide Microscopy)")


def _check_crop_size(path: Path, width: int, height: int) -> None:
    _check_field_size(path, width, height)  # too large for `cytoedge score` as well: say where it belongs
    if max(width, height) > MAX_CROP_SIDE_PX:
        raise InputLimitError(f"{path}: {width}×{height} px is a field or a slide, not a single-cell crop (a crop "
                              f"is at most {MAX_CROP_SIDE_PX} px a side); score it with `cytoedge score`")


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 ``[H, W, 3]``; InputImageError names the file and the problem.
    An image over MAX_FIELD_PIXELS is refused (InputLimitError) from its header, before it is decoded."""
    return _read_image(Path(path), _check_field_size)


def read_crop(path: str | Path) -> np.ndarray:
    """A single-cell crop, as ``read_rgb``. An image with a side over MAX_CROP_SIDE_PX is a field or a
    slide, which classified as one cell comes back as a confident nonsense: it is refused
    (InputLimitError), from its header where Pillow can read one."""
    return _read_image(Path(path), _check_crop_size)


def _read_image(path: Path, check_size: Callable[[Path, int, int], None]) -> np.ndarray:
    """Decode ``path`` as RGB uint8 once ``check_size`` accepts the header's (width, height), and again the
    decoded size (a format only OpenCV knows has no header size)."""
    if not path.is_file():
        raise InputImageError(f"{path}: no such file")
    size = header_size(path)
    if size is not None:
        check_size(path, *size)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as e:
        raise InputImageError(f"{path}: cannot be read ({e.strerror or e})") from None
    if data.size == 0:
        raise InputImageError(f"{path}: file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputImageError(f"{path}: not a readable image (corrupt, truncated, or an unsupported format)")
    check_size(path, img.shape[1], img.shape[0])
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:
            img = (img / 257).round().astype(np.uint8)
        else:
            raise InputImageError(f"{path}: pixel type {img.dtype} is not supported (expected 8- or 16-bit)")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise InputImageError(f"{path}: {img.shape[2]} channels; expected grey, RGB or RGBA")
    return img


def to_model_scale(rgb: np.ndarray, um_per_px: float, bundle: ModelBundle) -> np.ndarray:
    """Resample an RGB image so one pixel is ``bundle.um_per_px`` (area averaging when shrinking)."""
    factor = um_per_px / bundle.um_per_px
    if abs(factor - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


def default_crop_um_per_px(bundle: ModelBundle) -> float:
    """Scale assumed for single-cell crops when none is given: the training crops' scale."""
    return bundle.crop_um_per_px


def crop_to_tile(rgb: np.ndarray, bundle: ModelBundle, um_per_px: float | None = None, name: str = "image") -> np.ndarray:
    """A single-cell crop (cell centred) → its centred square at model scale; InputImageError names ``name``."""
    scale = um_per_px or default_crop_um_per_px(bundle)
    h, w = rgb.shape[:2]
    s = min(h, w)
    square = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    tile = to_model_scale(square, scale, bundle)
    if min(tile.shape[:2]) < bundle.input_size // 2:
        raise InputImageError(f"{name}: {w}×{h} px at {scale:.3g} µm/px is too small for the model's "
                              f"{bundle.input_size}-px field of view (crops at another scale need --um-per-px; "
                              f"cells drawn by `cytoedge synth` are at {bundle.um_per_px:.3g} µm/px)")
    return tile


def on_input_lattice(x: float, input_size: int) -> float:
    """The nearest position (halves rounded up) at which a cell's ``input_size`` cut falls on the
    tile's pixel grid: a pixel centre for an odd input, a pixel corner for an even one. The cut is then
    copied, not interpolated; off the grid every input pixel is a 2×2 average, which cost the bundled
    model 10 points of balanced accuracy on PBC crops whose tiles had an odd side (59 or 61 px: 0.84-0.85;
    60: 0.94). Moves the cell by at most half a pixel."""
    offset = ((input_size - 1) / 2.0) % 1.0
    return float(np.floor(x - offset + 0.5) + offset)


def tiles_to_batch(tiles: list[np.ndarray], input_size: int) -> CellBatch:
    """One cell at the centre of each model-scale tile (on the ``input_size`` cut's pixel lattice)."""
    centres = [(on_input_lattice((t.shape[1] - 1) / 2.0, input_size), on_input_lattice((t.shape[0] - 1) / 2.0,
                                                                                       input_size)) for t in tiles]
    centres = np.array(centres, np.float64).reshape(-1, 2)
    return CellBatch(tiles, cell_table(np.arange(len(tiles)), centres[:, 0], centres[:, 1]))


def crops_to_batch(images: list[np.ndarray], bundle: ModelBundle,
                   um_per_px: float | Sequence[float] | None = None, names: list[str] | None = None) -> CellBatch:
    """Single-cell crops (cell centred) → one tile per crop at model scale, one cell per tile. The
    scale is one for all, one per crop (runtime/crop_scale.py estimates them), or None (the bundle's
    training-crop scale); errors name the crop by ``names`` (e.g. its file) or its index."""
    names = names or [f"image {k}" for k in range(len(images))]
    scales = list(um_per_px) if isinstance(um_per_px, Sequence) else [um_per_px] * len(images)
    return tiles_to_batch([crop_to_tile(rgb, bundle, um, name) for rgb, um, name in zip(images, scales, names)],
                          bundle.input_size)
