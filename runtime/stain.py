"""Stain normalisation to the bundle's reference colours: Reinhard (default), Macenko, histogram matching.

Each lab's stain and camera shift the colours; the denoiser learned PBC's. Every method is used the
same way (:class:`StainNormaliser`): *fit* on a field or a crop gives a :class:`StainMap`, which is
*applied* to pixels. A fit returns None where there is too little stain to fit on (empty glass, a
uniform tile, a degenerate Macenko unmixing); the pixels are then left as scanned, never guessed at.

- ``reinhard`` (Reinhard et al. 2001): per-channel mean and standard deviation in OpenCV's uint8 LAB.
- ``macenko`` (Macenko et al. 2009; the stain vectors come from torchstain's numpy backend): the two
  dyes' optical-density vectors and the 99th-percentile amount of each; a field is unmixed with its own
  vectors and remixed with the reference's. Romanowsky stains have two dyes (azure / methylene blue and
  eosin), as H&E has, so the method carries over.
- ``histogram``: each RGB channel's distribution matched to the reference's quantiles.

A map is applied to the field tile at model scale *before* cells are cut (none of these is an affine map
of RGB, so it cannot be folded into the kernels' per-channel ColourTransform), and empty glass stays as it
is. The scorer fits once per slide (or per field of a folder) on its first tile with cells, over pixels
that are not glass, so every tile of a slide gets the same map and a cell's result does not depend on
which tile it fell in. The targets are ``manifest["stain_reference"]``: Reinhard's LAB mean and std at its
top level, ``macenko`` and ``histogram`` entries beside them, all fitted on the same training crops
(:func:`fit_reference`; export/make_bundle.py, or export/stain_reference.py for an existing bundle).
Which method is the default, and why: benchmarks/RESULTS.md, "Stain normalisation choices".
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BundleError, CytoedgeError

log = logging.getLogger(__name__)

METHODS = ("reinhard", "macenko", "histogram")
GLASS_LEVEL = 250  # pixels with every channel at or above this are empty glass / absent frames
MIN_STD = 1e-3
MIN_PIXELS = 100  # non-glass pixels a fit needs
# Macenko, as torchstain fits it: its transmitted-light level (pixels are rescaled so that their own background
# is at it), the optical density under which a channel counts as unstained (pixels unstained in any channel are
# left out of the fit) and the percentile of stain angles kept.
MACENKO_IO = 240.0
MACENKO_BETA = 0.15
MACENKO_ALPHA = 1.0
MACENKO_MIN_STAINED = 500  # stained pixels a Macenko fit needs
MACENKO_MAX_COS = 0.995  # two stain vectors closer than this are one dye: the unmixing is degenerate
HISTOGRAM_LEVELS = np.linspace(0.0, 1.0, 101)  # quantile levels of the histogram target


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """The ``[N, 3]`` pixels that are not empty glass."""
    px = rgb.reshape(-1, 3)
    return px[~(px >= GLASS_LEVEL).all(axis=1)]


def _keep_glass(out: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    glass = (rgb >= GLASS_LEVEL).all(axis=2)
    out[glass] = rgb[glass]
    return out


def _rounded(values, digits: int | None):
    return np.asarray(values, float).tolist() if digits is None else np.round(np.asarray(values, float), digits).tolist()


# ---- Reinhard ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self, digits: int | None = 3) -> dict:
        return {"mean": _rounded(self.mean, digits), "std": _rounded(self.std, digits)}


def lab_stats(rgb: np.ndarray) -> LabStats | None:
    """Mean and std of OpenCV uint8 LAB over the non-glass pixels; None if there are too few."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    keep = ~(rgb.reshape(-1, 3) >= GLASS_LEVEL).all(axis=1)
    if keep.sum() < MIN_PIXELS:
        return None
    lab = lab[keep]
    return LabStats(tuple(lab.mean(0)), tuple(np.maximum(lab.std(0), MIN_STD)))


def reference_stats(bundle: ModelBundle) -> LabStats | None:
    """The bundle's Reinhard reference (``manifest["stain_reference"]``), or None when it has none."""
    ref = bundle.stain_reference
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
    return _keep_glass(out, rgb)


# ---- Macenko ----------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StainVectors:
    """Two dyes in optical density: ``stains`` ``[3, 2]`` (unit columns per RGB channel; the reference's
    first column is the dye absorbing red most), each dye's 99th-percentile amount ``max_concentrations``
    ``[2]``, and ``light`` ``[3]``, the RGB of the field's background (its 99th-percentile pixel), which
    optical density is taken against. A smear's background is plasma, not white glass: against a fixed
    white level its tint would be read as stain and painted over the whole field."""

    stains: np.ndarray
    max_concentrations: np.ndarray
    light: np.ndarray

    def to_dict(self, digits: int | None = 4) -> dict:
        return {"stain_matrix": _rounded(self.stains, digits),
                "max_concentrations": _rounded(self.max_concentrations, digits), "light": _rounded(self.light, digits)}

    def matched_to(self, target: "StainVectors") -> "StainVectors":
        """These vectors in the order of ``target``'s dyes: the pairing of the two with the larger summed
        cosine (which dye absorbs red most differs between stains and between fields of one slide)."""
        cos = self.stains.T @ target.stains  # unit columns
        if cos[0, 1] + cos[1, 0] > cos[0, 0] + cos[1, 1]:
            return StainVectors(self.stains[:, ::-1], self.max_concentrations[::-1], self.light)
        return self

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "StainVectors":
        stains, max_c = np.asarray(d.get("stain_matrix"), float), np.asarray(d.get("max_concentrations"), float)
        light = np.asarray(d.get("light"), float)
        if (stains.shape != (3, 2) or max_c.shape != (2,) or light.shape != (3,)
                or not (np.isfinite(stains).all() and (max_c > 0).all() and (light > 0).all())):
            raise BundleError(f"{where}: a Macenko target needs 'stain_matrix' [3][2], two positive "
                              "'max_concentrations' and a positive RGB 'light'")
        return cls(stains, max_c, light)


def _optical_density(pixels: np.ndarray, light: np.ndarray) -> np.ndarray:
    return -np.log((pixels.astype(np.float64) + 1.0) / (light + 1.0))


def macenko_vectors(pixels: np.ndarray) -> StainVectors | None:
    """The stain vectors of ``pixels`` ``[N, 3]`` (torchstain's Macenko fit, against their own background
    light), or None where they are degenerate: too few stained pixels, not finite, or one dye twice."""
    try:
        from torchstain.numpy.normalizers import NumpyMacenkoNormalizer
    except ImportError:
        raise CytoedgeError("stain method 'macenko' needs the torchstain package: pip install torchstain") from None
    light = np.percentile(pixels, 99, axis=0).astype(np.float64)
    od = _optical_density(pixels, light)
    if (light < 1).any() or int((od >= MACENKO_BETA).all(axis=1).sum()) < MACENKO_MIN_STAINED:
        return None
    fitter = NumpyMacenkoNormalizer()
    try:
        with np.errstate(all="ignore"):  # torchstain's Io is one level for all channels: rescale to it
            fitter.fit((pixels + 1.0) * (MACENKO_IO / (light + 1.0)) - 1.0, Io=MACENKO_IO, alpha=MACENKO_ALPHA,
                       beta=MACENKO_BETA)
    except (np.linalg.LinAlgError, ValueError, IndexError):
        return None
    stains = np.asarray(fitter.HERef, np.float64)
    if stains.shape != (3, 2) or not np.isfinite(stains).all():
        return None
    stains = stains * np.where(stains.sum(axis=0) < 0, -1.0, 1.0)  # an eigenvector's sign is arbitrary
    if stains[0, 0] < stains[0, 1]:
        stains = stains[:, ::-1]
    norms = np.linalg.norm(stains, axis=0)
    if (norms < 1e-6).any() or abs(stains[:, 0] @ stains[:, 1]) / norms.prod() > MACENKO_MAX_COS:
        return None
    stains = stains / norms
    max_c = np.percentile(od @ np.linalg.pinv(stains).T, 99, axis=0)
    if not (np.isfinite(max_c).all() and (max_c > 1e-3).all()):
        return None
    return StainVectors(stains, max_c, light)


@dataclass(frozen=True, eq=False)
class MacenkoMap:
    source: StainVectors
    target: StainVectors

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        src, tgt = self.source, self.target
        concentrations = _optical_density(rgb.reshape(-1, 3), src.light) @ np.linalg.pinv(src.stains).T
        concentrations *= tgt.max_concentrations / src.max_concentrations
        out = (tgt.light + 1.0) * np.exp(-concentrations @ tgt.stains.T) - 1.0
        return _keep_glass(np.clip(out + 0.5, 0, 255).astype(np.uint8).reshape(rgb.shape), rgb)

    def to_dict(self, digits: int | None = 4) -> dict:
        return self.source.to_dict(digits)


# ---- histogram matching -----------------------------------------------------------------------------
def channel_quantiles(pixels: np.ndarray) -> np.ndarray:
    """``[3, len(HISTOGRAM_LEVELS)]``: each channel's quantiles over ``pixels`` ``[N, 3]``."""
    return np.quantile(pixels.astype(np.float64), HISTOGRAM_LEVELS, axis=0).T


@dataclass(frozen=True, eq=False)
class HistogramMap:
    lut: np.ndarray  # [3, 256] uint8: the new value of each channel's value

    @classmethod
    def fitted(cls, pixels: np.ndarray, target: np.ndarray) -> "HistogramMap":
        """Each value goes to the target's quantile at its (mid-step) rank among ``pixels``."""
        lut = []
        for c in range(3):
            counts = np.bincount(pixels[:, c], minlength=256).astype(np.float64)
            rank = (np.cumsum(counts) - counts / 2) / counts.sum()
            lut.append(np.interp(rank, HISTOGRAM_LEVELS, target[c]))
        return cls(np.clip(np.asarray(lut) + 0.5, 0, 255).astype(np.uint8))

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        out = np.stack([self.lut[c][rgb[..., c]] for c in range(3)], axis=-1)
        return _keep_glass(out, rgb)

    def to_dict(self, digits: int | None = None) -> dict:
        return {"lut": self.lut.tolist()}


# ---- the common interface ---------------------------------------------------------------------------
class StainMap(Protocol):
    """A fitted map: ``apply`` to RGB uint8 ``[H, W, 3]`` pixels; ``to_dict`` what was fitted (JSON-ready;
    ``digits=None``: full precision, which :meth:`StainNormaliser.restore` reads back exactly)."""

    def apply(self, rgb: np.ndarray) -> np.ndarray: ...

    def to_dict(self, digits: int | None = ...) -> dict: ...


@dataclass(frozen=True, eq=False)
class StainNormaliser:
    """One method and its target: ``fit`` on a field or crop, ``normalise`` a crop on its own fit."""

    method: str
    target: LabStats | StainVectors | np.ndarray  # np.ndarray: the histogram target's channel quantiles

    def fit(self, rgb: np.ndarray) -> StainMap | None:
        """The map from ``rgb``'s colours to the target's, or None where there is too little to fit on."""
        pixels = _tissue(rgb)
        if len(pixels) < MIN_PIXELS:
            return None
        if self.method == "reinhard":
            return ReinhardMap(lab_stats(rgb), self.target)
        if self.method == "macenko":
            source = macenko_vectors(pixels)
            return None if source is None else MacenkoMap(source.matched_to(self.target), self.target)
        return HistogramMap.fitted(pixels, self.target)

    def restore(self, fitted: dict) -> StainMap:
        """The map ``to_dict(digits=None)`` described (a slide continued from a checkpoint)."""
        if self.method == "reinhard":
            return ReinhardMap(LabStats(tuple(fitted["mean"]), tuple(fitted["std"])), self.target)
        if self.method == "macenko":
            return MacenkoMap(StainVectors.from_dict(fitted, "stain checkpoint"), self.target)
        return HistogramMap(np.asarray(fitted["lut"], np.uint8))

    def normalise(self, rgb: np.ndarray) -> np.ndarray:
        """``rgb`` mapped on its own fit (a single-cell crop), or as it is where nothing can be fitted."""
        stain_map = self.fit(rgb)
        return rgb if stain_map is None else stain_map.apply(rgb)


@dataclass(frozen=True)
class ReinhardMap:
    source: LabStats
    target: LabStats

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        return reinhard(rgb, self.source, self.target)

    def to_dict(self, digits: int | None = 3) -> dict:
        return self.source.to_dict(digits)


def stain_normaliser(bundle: ModelBundle, method: str = "reinhard") -> StainNormaliser | None:
    """``method`` with the bundle's target for it. None for Reinhard when the bundle has no stain reference
    at all (its colours are then left as scanned); BundleError when another method's target is missing."""
    if method not in METHODS:
        raise CytoedgeError(f"stain method {method!r}: choose one of {', '.join(METHODS)}")
    reference = reference_stats(bundle)
    if method == "reinhard":
        return None if reference is None else StainNormaliser(method, reference)
    entry = (bundle.stain_reference or {}).get(method)
    if not entry:
        raise BundleError(f"{bundle.path}: the manifest's stain_reference has no '{method}' target; fit it on the "
                          f"bundle's training crops: python -m cytoedge.export.stain_reference --model {bundle.path}")
    where = f"{bundle.path}: stain_reference.{method}"
    if method == "macenko":
        return StainNormaliser(method, StainVectors.from_dict(entry, where))
    quantiles = np.asarray(entry.get("quantiles"), float)
    if quantiles.shape != (3, len(HISTOGRAM_LEVELS)) or not (np.diff(quantiles, axis=1) >= 0).all():
        raise BundleError(f"{where}: 'quantiles' must be 3 rising rows of {len(HISTOGRAM_LEVELS)} values "
                          "(each RGB channel at levels 0, 0.01, ..., 1)")
    return StainNormaliser(method, quantiles)


def fit_reference(images_rgb: np.ndarray) -> dict:
    """The ``macenko`` and ``histogram`` targets of ``manifest["stain_reference"]``, over the non-glass
    pixels of the training crops ``[N, H, W, 3]`` (the crops Reinhard's mean and std are taken on)."""
    from importlib.metadata import version

    pixels = _tissue(np.asarray(images_rgb))
    vectors = macenko_vectors(pixels)
    if vectors is None:
        raise CytoedgeError(f"stain reference: no Macenko stain vectors could be fitted on {len(images_rgb)} crops")
    return {"macenko": {**vectors.to_dict(), "fitted_by": f"torchstain {version('torchstain')} (numpy backend), "
                        f"against the 99th-percentile pixel, alpha {MACENKO_ALPHA:g}, beta {MACENKO_BETA:g}"},
            "histogram": {"space": "rgb", "levels": "0, 0.01, ..., 1",
                          "quantiles": np.round(channel_quantiles(pixels), 2).tolist()}}
