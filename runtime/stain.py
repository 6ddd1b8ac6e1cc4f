"""Stain normalisation (Reinhard et al. 2001) to the bundle's reference colours.

Each lab's stain and camera shift the colours; the denoiser learned PBC's. Reinhard matches the
per-channel mean and standard deviation in LAB (here OpenCV's uint8 LAB, the space of
``manifest["stain_reference"]``) of a field to the reference. It is applied to the field tile at
model scale *before* cells are cut (LAB is not an affine map of RGB, so it cannot be folded into
the kernels' per-channel ColourTransform). The statistics are fitted once per slide (or per field
of a folder) from its first tile with cells, over pixels that are not empty glass, so every tile
of a slide gets the same map and a cell's result does not depend on which tile it fell in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BundleError

log = logging.getLogger(__name__)

GLASS_LEVEL = 250  # pixels with every channel at or above this are empty glass / absent frames
MIN_STD = 1e-3


@dataclass(frozen=True)
class LabStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"mean": [round(v, 3) for v in self.mean], "std": [round(v, 3) for v in self.std]}


def lab_stats(rgb: np.ndarray) -> LabStats | None:
    """Mean and std of OpenCV uint8 LAB over the non-glass pixels; None if there are too few."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    keep = ~(rgb.reshape(-1, 3) >= GLASS_LEVEL).all(axis=1)
    if keep.sum() < 100:
        return None
    lab = lab[keep]
    return LabStats(tuple(lab.mean(0)), tuple(np.maximum(lab.std(0), MIN_STD)))


def reference_stats(bundle: ModelBundle) -> LabStats | None:
    """The bundle's reference (``manifest["stain_reference"]``), or None when it has none."""
    ref = bundle.manifest.get("stain_reference")
    if not ref:
        return None
    if ref.get("method") != "reinhard" or ref.get("space") != "opencv-lab-uint8":
        raise BundleError(f"{bundle.path}: stain_reference {ref.get('method')}/{ref.get('space')} is not "
                          "supported (reinhard / opencv-lab-uint8)")
    return LabStats(tuple(map(float, ref["mean"])), tuple(map(float, ref["std"])))


def reinhard(rgb: np.ndarray, source: LabStats, target: LabStats) -> np.ndarray:
    """Map ``rgb`` so its LAB statistics go from ``source`` to ``target``; empty glass stays white."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    gain = np.asarray(target.std, np.float32) / np.asarray(source.std, np.float32)
    lab = (lab - np.asarray(source.mean, np.float32)) * gain + np.asarray(target.mean, np.float32)
    out = cv2.cvtColor(np.clip(lab + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    glass = (rgb >= GLASS_LEVEL).all(axis=2)
    out[glass] = rgb[glass]
    return out


def normalise_crop(rgb: np.ndarray, reference: LabStats) -> np.ndarray:
    """A single-cell crop matched to ``reference`` on its own statistics (left as is if it is mostly glass)."""
    stats = lab_stats(rgb)
    return rgb if stats is None else reinhard(rgb, stats, reference)
