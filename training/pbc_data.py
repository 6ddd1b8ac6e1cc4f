"""PBC single-cell crops for training: loading, caching and augmentation.

The cache holds every crop once, centre-cropped to a square and downscaled so that the model's
field of view plus rotation margin fits; augmentation then cuts the model input with one affine
warp (rotation, flip, scale jitter, sub-pixel shift) and jitters the stain colours, because
stains and scanners vary between labs while a cell's class does not.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cytoedge.runtime.labelled_data import list_labelled_files

log = logging.getLogger(__name__)

@dataclass
class CellSet:
    """Square uint8 RGB crops ``[N, S, S, 3]`` with integer labels and their source files."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str]


def load_square_rgb(path: Path, size: int) -> np.ndarray:
    """Centre-crop an image to a square and resize it to ``size`` (area interpolation), RGB uint8."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot read image {path}")
    h, w = bgr.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    square = bgr[y0:y0 + s, x0:x0 + s]
    return cv2.cvtColor(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def load_cell_set(root: Path, cache_dir: Path, cache_size: int, class_names: list[str] | None = None) -> CellSet:
    """Load (and cache as .npz) every crop of a labelled folder at ``cache_size`` pixels square."""
    files, labels, class_names = list_labelled_files(root, class_names)
    key = hashlib.sha256(("\n".join(map(str, files)) + f"|{cache_size}").encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{Path(root).name}_{cache_size}_{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            images = z["images"]
        log.info("loaded %d cached crops from %s", len(images), cache)
    else:
        images = np.stack([load_square_rgb(f, cache_size) for f in files])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images)
        log.info("cached %d crops to %s", len(images), cache)
    return CellSet(images, labels, class_names, [str(f) for f in files])


# Augmentation strengths. A run whose config has no "augment" block trained with LEGACY_AUGMENT
# (the first bundled model); new runs use STRONG_AUGMENT so that morphology, not one lab's colours,
# scale or optics, decides (HED-space stain jitter after Tellez et al. 2018, blur, JPEG, scale ±25 %).
LEGACY_AUGMENT = {"scale_jitter": 0.08, "shift_px": 1.0, "colour_jitter": 0.08, "hed_jitter": 0.0,
                  "blur_prob": 0.0, "blur_sigma": [0.3, 1.0], "jpeg_prob": 0.0, "jpeg_quality": [40, 90]}
STRONG_AUGMENT = {"scale_jitter": 0.25, "shift_px": 1.0, "colour_jitter": 0.2, "hed_jitter": 0.05,
                  "blur_prob": 0.25, "blur_sigma": [0.3, 1.0], "jpeg_prob": 0.25, "jpeg_quality": [40, 90]}

# Haematoxylin / eosin / DAB optical densities per RGB channel (Ruifrok & Johnston 2001, as in
# scikit-image's rgb_from_hed); used only to perturb stain amounts, not to unmix exactly.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def augment_batch(
    images: np.ndarray, out_size: int, zoom: float, rng: np.random.Generator, augment: dict | None = None,
) -> np.ndarray:
    """Random rotation/flip/scale/shift, stain jitter, blur and JPEG; float32 RGB in [0, 1], ``[B,S,S,3]``.

    ``zoom`` is cache pixels per output pixel at scale 1; ``augment`` holds the strengths
    (keys of ``STRONG_AUGMENT``; ``LEGACY_AUGMENT`` when None).
    """
    a = {**LEGACY_AUGMENT, **(augment or {})}
    n, size = images.shape[0], images.shape[1]
    out = np.empty((n, out_size, out_size, 3), dtype=np.float32)
    c_in, c_out = (size - 1) / 2.0, (out_size - 1) / 2.0
    for i in range(n):
        theta = rng.uniform(0, 2 * np.pi)
        s = zoom * (1.0 + rng.uniform(-a["scale_jitter"], a["scale_jitter"]))
        flip = -1.0 if rng.random() < 0.5 else 1.0
        rot = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        rot = rot @ np.diag([flip, 1.0])
        shift = rng.uniform(-a["shift_px"], a["shift_px"], 2) * zoom
        # Maps output pixel p to source pixel c_in + rot (p - c_out) + shift.
        m = np.hstack([rot, (np.array([c_in, c_in]) + shift - rot @ np.array([c_out, c_out]))[:, None]])
        out[i] = cv2.warpAffine(images[i], m, (out_size, out_size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_REFLECT_101).astype(np.float32) / 255.0
    if a["hed_jitter"] > 0:
        out = jitter_hed(out, rng, a["hed_jitter"])
    out = jitter_stain(out, rng, a["colour_jitter"])
    return degrade_optics(out, rng, a)


def jitter_hed(x: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Scale and shift each stain's optical density per image (x in [0, 1], ``[B,H,W,3]``)."""
    n = x.shape[0]
    od = -np.log(np.clip(x, 1.0 / 255.0, 1.0))
    hed = od @ HED_FROM_RGB
    alpha = 1.0 + rng.uniform(-sigma, sigma, (n, 1, 1, 3)) * 4.0
    beta = rng.uniform(-sigma, sigma, (n, 1, 1, 3))
    od = (hed * alpha + beta) @ RGB_FROM_HED
    return np.clip(np.exp(-od), 0.0, 1.0).astype(np.float32)


def degrade_optics(x: np.ndarray, rng: np.random.Generator, a: dict) -> np.ndarray:
    """Defocus blur and JPEG artefacts on a random share of the batch, as other scanners produce."""
    for i in range(x.shape[0]):
        if rng.random() < a["blur_prob"]:
            x[i] = cv2.GaussianBlur(x[i], (0, 0), float(rng.uniform(*a["blur_sigma"])))
        if rng.random() < a["jpeg_prob"]:
            q = int(rng.integers(a["jpeg_quality"][0], a["jpeg_quality"][1] + 1))
            ok, buf = cv2.imencode(".jpg", (x[i] * 255.0 + 0.5).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
            if ok:
                x[i] = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).astype(np.float32) / 255.0
    return x


def jitter_stain(x: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Per-image brightness, contrast, saturation and per-channel gain changes (x in [0, 1])."""
    n = x.shape[0]
    gain = 1.0 + rng.uniform(-amount, amount, (n, 1, 1, 3)) * 0.5
    bright = rng.uniform(-amount, amount, (n, 1, 1, 1))
    contrast = 1.0 + rng.uniform(-amount, amount, (n, 1, 1, 1))
    sat = 1.0 + rng.uniform(-2 * amount, 2 * amount, (n, 1, 1, 1))
    grey = x.mean(axis=3, keepdims=True)
    x = grey + (x - grey) * sat
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean + bright
    return np.clip(x * gain, 0.0, 1.0).astype(np.float32)
