"""Input limits, checked where inputs enter (CLI options, files, wire messages).

One place for every bound, so the CLI, the file readers and the scanner link refuse the same
things with the same numbers, and docs/protocol.md can quote them. Each bound keeps one input
from asking for an unbounded allocation: a scale far from the model's makes the resampled tile
huge, an image far larger than a crop or a field is decoded whole, a zero-sized DICOM frame divides
by zero.
"""
from __future__ import annotations

import math

from cytoedge.runtime.errors import CytoedgeError

# Pixel size accepted anywhere (µm per pixel). 0.02 is finer than any bright-field objective
# resolves (100x oil, NA 1.4: ~0.2 µm); 2.0 is a 5x objective, where a white cell is ~6 px and
# nothing of its morphology is left to read.
UM_PER_PX_MIN = 0.02
UM_PER_PX_MAX = 2.0
# A single-cell crop (classify, evaluate, calibrate): 2048 px a side is a 200-400 µm field at
# analyser scales, far larger than any analyser's crop (CellaVision writes ~360 px). Larger
# images are fields or slides: `cytoedge score` reads them tile by tile.
MAX_CROP_SIDE_PX = 2048
# A field image file (PNG/JPEG/TIFF/BMP) is decoded whole: 150 M px is 450 MB of RGB. Larger
# images belong in a tiled format (DICOM VL Whole Slide Microscopy).
MAX_FIELD_PIXELS = 150_000_000
# A tile resampled to the model's scale (pixels); the scorer shrinks its tiles to stay under it
# and the scanner link refuses an in-band tile that would exceed it.
MAX_MODEL_SCALE_TILE_PIXELS = 64_000_000
# DICOM frame and total pixel matrix sides.
MAX_DICOM_SIDE_PX = 1_000_000


class InputLimitError(CytoedgeError):
    """An input is outside a documented limit; the message names the input, the value and the limit."""


def check_um_per_px(value: object, what: str = "um_per_px") -> float:
    """``value`` as a float µm/px if finite and inside [UM_PER_PX_MIN, UM_PER_PX_MAX]."""
    try:
        um = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputLimitError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(um) or not UM_PER_PX_MIN <= um <= UM_PER_PX_MAX:
        raise InputLimitError(f"{what}: {value!r} µm/px is outside the supported range "
                              f"{UM_PER_PX_MIN}-{UM_PER_PX_MAX} µm/px")
    return um


def model_scale_pixels(height: int, width: int, um_per_px: float, model_um_per_px: float) -> int:
    """Pixels of an ``height`` × ``width`` image once resampled to the model's scale."""
    factor = um_per_px / model_um_per_px
    return int(max(1, round(width * factor)) * max(1, round(height * factor)))
