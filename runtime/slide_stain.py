"""The stain stage of a slide: one map to the bundle's reference, fitted once and applied to every tile.

Per slide (the default), the map is fitted on the slide's first tile with cells and then applied to
every tile: a slide is one staining run, so one map keeps its cells comparable. Per cell, each cell's
field of a PBC crop's size is matched on its own (see ``ScoringOptions.stain_context`` for why that is
not the default). A field with too little stain to fit on stays as scanned, and the summary says so.
"""
from __future__ import annotations

import logging

import numpy as np

from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.stain import METHODS, StainMap, StainNormaliser, stain_normaliser

log = logging.getLogger(__name__)

CONTEXTS = ("slide", "cell")


def check_stain_options(method: str, context: str) -> None:
    if context not in CONTEXTS:
        raise CytoedgeError(f"stain_context {context!r}: choose 'cell' or 'slide'")
    if method not in METHODS:
        raise CytoedgeError(f"stain_method {method!r}: choose one of {', '.join(METHODS)}")


def slide_stain(bundle: ModelBundle, method: str, context: str) -> "SlideStain | None":
    """The stage for ``bundle``'s reference, or None where it has none (colours are then left as scanned)."""
    check_stain_options(method, context)
    normaliser = stain_normaliser(bundle, method)
    return None if normaliser is None else SlideStain(normaliser, context)


class SlideStain:
    """Fits and applies one slide's stain map (``context`` "slide") or each cell field's ("cell")."""

    def __init__(self, normaliser: StainNormaliser, context: str):
        self.method, self.context = normaliser.method, context
        self._normaliser = normaliser
        self.map: StainMap | None = None
        self.tried = False  # the slide's map was fitted, or could not be: its colours stay as scanned

    def reset(self) -> None:
        self.map, self.tried = None, False

    def tile(self, rgb: np.ndarray, slide: str) -> np.ndarray:
        """A tile with cells in the slide's colours mapped (the map is fitted on the first such tile)."""
        if not self.tried:
            self.map, self.tried = self._normaliser.fit(rgb), True
            if self.map is None:
                log.warning("%s: too little stain on its first tile with cells to fit a %s map on; its "
                            "colours are left as scanned", slide, self.method)
        return self.map.apply(rgb) if self.map is not None else rgb

    def field(self, rgb: np.ndarray) -> np.ndarray:
        """One cell's field matched on its own (context "cell")."""
        return self._normaliser.normalise(rgb)

    def describe(self) -> dict:
        """The summary's "stain": method, context, the fitted map, and whether the slide stayed as scanned."""
        return {"method": self.method, "context": self.context,
                "fitted": self.map.to_dict() if self.map else None,
                "left_as_scanned": self.context == "slide" and self.tried and self.map is None}

    def checkpoint(self) -> dict:
        return {"stain": self.map.to_dict(None) if self.map else None, "stain_tried": self.tried}

    def restore(self, checkpoint: dict) -> None:
        fitted = checkpoint.get("stain")
        self.map = self._normaliser.restore(fitted) if fitted else None
        self.tried = checkpoint.get("stain_tried", self.map is not None)
