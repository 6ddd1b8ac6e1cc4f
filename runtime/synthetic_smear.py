"""Synthetic smears with known ground truth, and a DICOM WSI writer for them.

White cells are drawn from the bundled denoiser (DDIM, :func:`cytoedge.runtime.sampler.ddim_sample`)
and pasted, with a soft round edge, on a background of red cells (pale discs with central pallor)
and a few platelets. Nothing real is shipped: the demo and the tests make their slides here.
Red-cell size follows the 7.5 µm convention the scale estimator also uses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.sampler import ddim_sample
from cytoedge.runtime.scale import RED_CELL_DIAMETER_UM

log = logging.getLogger(__name__)

# Plasma and red-cell colours of PBC fields: the two k-means centres of border pixels of 80 PBC calib crops
# (62 % / 38 %). A field of these colours around a drawn cell has PBC's colour statistics, so the scorer's
# stain normalisation leaves the drawn cell (already in the model's colours) nearly as it is.
PLASMA_RGB = (249, 224, 202)
RED_CELL_RGB = (206, 170, 169)
PLATELET_RGB = (150, 110, 175)


@dataclass(frozen=True)
class SmearSpec:
    """What to draw. ``classes`` are the white-cell classes, repeated to ``n_white`` cells."""

    n_white: int = 100
    classes: tuple[str, ...] = ()
    um_per_px: float = 0.2
    white_spacing_um: float = 36.0
    red_cell_cover: float = 0.35
    platelets_per_white: float = 1.0
    ddim_steps: int = 50
    seed: int = 0
    guidance: float | None = None  # None: the bundle's classifier-free guidance scale


@dataclass
class SyntheticSmear:
    rgb: np.ndarray
    um_per_px: float
    truth: list[dict] = field(default_factory=list)  # one per white cell: id, class, centre, bbox
    n_red: int = 0
    n_platelets: int = 0


def sample_cells(bundle: ModelBundle, backend: DenoiserBackend, class_names: list[str], steps: int,
                 seed: int, chunk: int = 64, guidance: float | None = None) -> np.ndarray:
    """DDIM-sample one cell per class name; RGB uint8 ``[N, S, S, 3]`` at model scale (``guidance``:
    None = the bundle's scale)."""
    unknown = sorted(set(class_names) - set(bundle.class_names))
    if unknown:
        raise CytoedgeError(f"unknown class {unknown}; the model knows {bundle.class_names}")
    ids = np.array([bundle.class_names.index(c) for c in class_names], np.int64)
    out = [ddim_sample(bundle, backend, ids[i:i + chunk], steps=steps, seed=seed + i, guidance=guidance)
           for i in range(0, len(ids), chunk)]
    return np.concatenate(out) if out else np.zeros((0, bundle.input_size, bundle.input_size, 3), np.uint8)


def _disc_alpha(size: int, radius: float, soft: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2.0
    d = np.sqrt((yy - c) ** 2 + (xx - c) ** 2)
    return np.clip((radius - d) / max(soft, 1e-6) + 0.5, 0.0, 1.0).astype(np.float32)


def _draw_red_cell(canvas: np.ndarray, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    x0, y0 = int(max(cx - r - 2, 0)), int(max(cy - r - 2, 0))
    x1, y1 = int(min(cx + r + 3, canvas.shape[1])), int(min(cy + r + 3, canvas.shape[0]))
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
    alpha = np.clip((1.0 - d) * r / 1.5 + 0.5, 0, 1)[..., None]
    pallor = np.clip(1.0 - d / 0.45, 0, 1)[..., None] * 0.45  # lighter centre of a biconcave disc
    tint = np.asarray(RED_CELL_RGB, np.float32) * (1 + rng.normal(0, 0.02))
    colour = tint * (1 - pallor) + np.asarray(PLASMA_RGB, np.float32) * pallor
    patch = canvas[y0:y1, x0:x1].astype(np.float32)
    canvas[y0:y1, x0:x1] = (patch * (1 - alpha) + colour * alpha).round().astype(np.uint8)


def compose_smear(cells: np.ndarray, classes: list[str], bundle: ModelBundle, spec: SmearSpec) -> SyntheticSmear:
    """Lay sampled white cells on a jittered grid over a red-cell background. Pure given ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    n = len(cells)
    per_row = max(1, int(np.ceil(np.sqrt(n))))
    rows = max(1, int(np.ceil(n / per_row)))
    step = spec.white_spacing_um / spec.um_per_px
    width, height = int(round(per_row * step)), int(round(rows * step))
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = PLASMA_RGB
    canvas = np.clip(canvas + rng.normal(0, 2.0, canvas.shape), 0, 255).astype(np.uint8)

    zoom = bundle.um_per_px / spec.um_per_px
    patch = int(round(bundle.input_size * zoom))
    cell_radius = 0.42 * patch
    centres = []
    for k in range(n):
        r, c = divmod(k, per_row)
        jitter = rng.uniform(-0.15, 0.15, 2) * step
        centres.append(((c + 0.5) * step + jitter[0], (r + 0.5) * step + jitter[1]))
    centres_arr = np.asarray(centres).reshape(-1, 2)

    red_r = RED_CELL_DIAMETER_UM / 2 / spec.um_per_px
    n_red_target = int(spec.red_cell_cover * width * height / (np.pi * red_r ** 2))
    n_red = 0
    for _ in range(n_red_target * 3):
        if n_red >= n_red_target:
            break
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if centres_arr.size and np.min(np.hypot(centres_arr[:, 0] - x, centres_arr[:, 1] - y)) < cell_radius + red_r:
            continue
        _draw_red_cell(canvas, x, y, red_r * rng.uniform(0.93, 1.07), rng)
        n_red += 1

    n_plt = int(round(spec.platelets_per_white * n))
    plt_r = 1.2 / spec.um_per_px
    for _ in range(n_plt):
        x, y = rng.uniform(plt_r, width - plt_r), rng.uniform(plt_r, height - plt_r)
        cv2.circle(canvas, (int(x), int(y)), max(1, int(plt_r)), PLATELET_RGB, -1, lineType=cv2.LINE_AA)

    alpha = _disc_alpha(patch, cell_radius, soft=0.06 * patch)[..., None]
    truth = []
    for k, ((cx, cy), cell) in enumerate(zip(centres, cells)):
        big = cv2.resize(cell, (patch, patch), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        x0, y0 = int(round(cx - (patch - 1) / 2)), int(round(cy - (patch - 1) / 2))
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + patch, width), min(y0 + patch, height)
        a = alpha[ya - y0:yb - y0, xa - x0:xb - x0]
        region = canvas[ya:yb, xa:xb].astype(np.float32)
        canvas[ya:yb, xa:xb] = (region * (1 - a) + big[ya - y0:yb - y0, xa - x0:xb - x0] * a).round().astype(np.uint8)
        rad = cell_radius
        truth.append({"id": k, "class": classes[k], "centre": [round(cx, 2), round(cy, 2)],
                      "bbox": [int(max(cx - rad, 0)), int(max(cy - rad, 0)),
                               int(min(cx + rad, width)), int(min(cy + rad, height))]})
    return SyntheticSmear(canvas, spec.um_per_px, truth, n_red, n_plt)


def generate_smear(bundle: ModelBundle, backend: DenoiserBackend, spec: SmearSpec) -> SyntheticSmear:
    """Sample ``spec.n_white`` white cells (classes cycled from ``spec.classes``, default all but
    platelets) and compose them into a smear."""
    pool = list(spec.classes) or [c for c in bundle.class_names if c != "platelet"]
    classes = [pool[k % len(pool)] for k in range(spec.n_white)]
    cells = sample_cells(bundle, backend, classes, spec.ddim_steps, spec.seed, guidance=spec.guidance)
    return compose_smear(cells, classes, bundle, spec)


def write_wsi_dicom(path: str | Path, frames: Iterable[tuple[int, int, np.ndarray]], total_size: tuple[int, int],
                    frame_size: int, um_per_px: float, codec: str = "native", organisation: str = "TILED_SPARSE",
                    identifiers: dict | None = None) -> Path:
    """Write a single-level DICOM VL Whole Slide Microscopy image.

    ``frames`` yields (row, col, rgb[frame, frame, 3]) with row/col the 0-based top-left pixel in
    the total matrix; TILED_FULL needs every grid frame in raster order, TILED_SPARSE any subset
    (so a 50,000² slide with a few frames stays small on disk and in memory). ``codec``: native,
    jpeg (baseline, Pillow) or jpeg2000 (Pillow/OpenJPEG). ``identifiers`` (DICOM keyword → value)
    sets or overrides header attributes, e.g. made-up patient identifiers for the privacy tests.
    """
    import io

    from PIL import Image
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, generate_uid)

    syntaxes = {"native": ExplicitVRLittleEndian, "jpeg": JPEGBaseline8Bit, "jpeg2000": JPEG2000Lossless}
    if codec not in syntaxes:
        raise CytoedgeError(f"codec {codec!r}: choose one of {sorted(syntaxes)}")
    if organisation not in ("TILED_FULL", "TILED_SPARSE"):
        raise CytoedgeError(f"organisation {organisation!r}: TILED_FULL or TILED_SPARSE")
    width, height = total_size
    encoded, positions = [], []
    for row, col, rgb in frames:
        tile = np.full((frame_size, frame_size, 3), 255, np.uint8)
        tile[:rgb.shape[0], :rgb.shape[1]] = rgb[:frame_size, :frame_size]
        positions.append((row, col))
        if codec == "native":
            encoded.append(tile.tobytes())
            continue
        buf = io.BytesIO()
        if codec == "jpeg":
            Image.fromarray(tile).save(buf, format="JPEG", quality=95, subsampling=0)
        else:
            Image.fromarray(tile).save(buf, format="JPEG2000", irreversible=False, no_jp2=True)
        encoded.append(buf.getvalue())

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntaxes[codec]
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality = "SM"
    ds.ImageType = ["DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.PatientName, ds.PatientID = "SYNTHETIC^SMEAR", "SYNTH0001"
    ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "1", "", "20260101", "000000"
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "cytoedge synthetic"
    ds.ContainerIdentifier = "SYNTH-SLIDE-1"
    for keyword, value in (identifiers or {}).items():
        if tag_for_keyword(keyword) is None:
            raise CytoedgeError(f"identifiers: {keyword!r} is not a DICOM keyword")
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = frame_size
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    ds.NumberOfFrames = len(encoded)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422" if codec == "jpeg" else "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.DimensionOrganizationType = organisation
    ds.ImagedVolumeWidth = width * um_per_px / 1000.0
    ds.ImagedVolumeHeight = height * um_per_px / 1000.0
    measures = Dataset()
    measures.PixelSpacing = [um_per_px / 1000.0, um_per_px / 1000.0]
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if organisation == "TILED_SPARSE":
        per_frame = []
        for row, col in positions:
            pos = Dataset()
            pos.RowPositionInTotalImagePixelMatrix = row + 1
            pos.ColumnPositionInTotalImagePixelMatrix = col + 1
            pos.XOffsetInSlideCoordinateSystem = col * um_per_px / 1000.0
            pos.YOffsetInSlideCoordinateSystem = row * um_per_px / 1000.0
            pos.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = Sequence([pos])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    if codec == "native":
        ds.PixelData = b"".join(encoded)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01" if codec == "jpeg" else "00"
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def frames_of(rgb: np.ndarray, frame_size: int, skip_blank: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """Cut an image into frames in raster order (for TILED_FULL, or TILED_SPARSE with blank frames left out)."""
    for row in range(0, rgb.shape[0], frame_size):
        for col in range(0, rgb.shape[1], frame_size):
            tile = rgb[row:row + frame_size, col:col + frame_size]
            if skip_blank and tile.min() >= 250:
                continue
            yield row, col, tile


def write_smear_files(smear: SyntheticSmear, folder: Path, dicom: bool = False, frame_size: int = 256) -> list[Path]:
    """smear.png + truth.json (and smear.dcm, a TILED_FULL JPEG WSI) in ``folder``."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / "smear.png"
    if not cv2.imwrite(str(png), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR)):
        raise CytoedgeError(f"{png}: could not write")
    truth = folder / "truth.json"
    truth.write_text(json.dumps({"um_per_px": smear.um_per_px, "width": smear.rgb.shape[1],
                                 "height": smear.rgb.shape[0], "red_cells": smear.n_red,
                                 "platelets": smear.n_platelets, "white_cells": smear.truth}, indent=1) + "\n")
    out = [png, truth]
    if dicom:
        h, w = smear.rgb.shape[:2]
        out.append(write_wsi_dicom(folder / "smear.dcm", frames_of(smear.rgb, frame_size), (w, h), frame_size,
                                   smear.um_per_px, codec="jpeg", organisation="TILED_FULL"))
    return out


def match_truth(truth: list[dict], cells: list[dict]) -> dict:
    """Match scored cells to drawn ones (nearest centre inside the drawn cell's box, one to one)."""
    used: set[int] = set()
    detected = agree = 0
    for t in truth:
        x0, y0, x1, y1 = t["bbox"]
        best, best_d = None, np.inf
        for k, c in enumerate(cells):
            cx, cy = c["centre"]
            if k in used or not (x0 <= cx <= x1 and y0 <= cy <= y1):
                continue
            d = np.hypot(cx - t["centre"][0], cy - t["centre"][1])
            if d < best_d:
                best, best_d = k, d
        if best is not None:
            used.add(best)
            detected += 1
            agree += cells[best]["class"] == t["class"]
    return {"truth": len(truth), "detected": detected, "extra": len(cells) - len(used),
            "class_agreement": agree / detected if detected else 0.0}
