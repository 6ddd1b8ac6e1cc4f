"""The production job scorer: the daemon's ScorerFactory backed by slide_scoring.SlideScorer.

The model bundle and backend are loaded once (by the caller) and shared by every job; each job
gets its own SlideScorer (a scorer accumulates one slide's state for its summary), with the same
ScoringOptions as ``cytoedge score`` so the service and a local run agree cell for cell.
With ``include_identifiers`` (the daemon's configuration key), a DICOM slide's header identifiers
are added to its summary, as ``cytoedge score --include-identifiers`` adds them to results.json.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.limits import MAX_MODEL_SCALE_TILE_PIXELS, model_scale_pixels
from cytoedge.runtime.red_cells import RedCellReader, RedCellSampling
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
from cytoedge.runtime.sources import DicomSlideSource, Opener, open_source


class SlideJob:
    """One job's SlideScorer behind the daemon's JobScorer protocol (made on first use)."""

    def __init__(self, factory: "SlideScorerFactory"):
        self.factory = factory
        self.scorer: SlideScorer | None = None
        self.identifiers: dict | None = None  # the slide's header identifiers, read only when configured

    def _scorer(self, options: ScoringOptions) -> SlideScorer:
        if self.scorer is None:
            f = self.factory
            red = RedCellReader(*f.red_cells) if f.red_cells else None
            self.scorer = SlideScorer(f.bundle, f.backend, f.estimator, options, red_cells=red)
        return self.scorer

    def score_path(self, path: Path, um_per_px: float | None, opener: Opener) -> Iterator[dict]:
        """As ``cytoedge score --um-per-px``: the job's scale overrides the file's and the estimate."""
        options = replace(self.factory.options, um_per_px=um_per_px) if um_per_px else self.factory.options
        scorer = self._scorer(options)
        source = open_source(path, options.um_per_px, opener=opener)
        try:
            if self.factory.include_identifiers and isinstance(source, DicomSlideSource):
                self.identifiers = source.identifiers()
            yield from scorer.score_source(source)
        finally:
            source.close()

    def score_tile(self, rgb: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        return self._scorer(self.factory.options).score_tile(rgb, origin_xy, um_per_px)

    def summary(self) -> dict:
        summary = self._scorer(self.factory.options).summary()
        return summary if self.identifiers is None else {**summary, "identifiers": self.identifiers}

    def checkpoint(self) -> dict:
        return self._scorer(self.factory.options).checkpoint()

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        self._scorer(self.factory.options).restore(checkpoint, records)


class SlideScorerFactory:
    """Hands each job a SlideScorer over the shared bundle and backend."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, estimator: str,
                 options: ScoringOptions = ScoringOptions(), include_identifiers: bool = False,
                 red_cells: tuple[ModelBundle, DenoiserBackend, RedCellSampling] | None = None):
        self.bundle, self.backend, self.estimator, self.options = bundle, backend, estimator, options
        self.include_identifiers = include_identifiers
        self.red_cells = red_cells  # (red-cell bundle, its backend), shared by every job's reader

    def identity(self) -> dict:
        """HELLO's model identity: the scorer's audit block (what `cytoedge score --json` records)."""
        audit = SlideScorer(self.bundle, self.backend, self.estimator, self.options).audit
        return {"name": self.bundle.name, **audit}

    def tile_refusal(self, height: int, width: int, um_per_px: float) -> str | None:
        pixels = model_scale_pixels(height, width, um_per_px, self.bundle.um_per_px)
        if pixels > MAX_MODEL_SCALE_TILE_PIXELS:
            return (f"{width}×{height} px at {um_per_px:g} µm/px is {pixels} px at the model's "
                    f"{self.bundle.um_per_px:g} µm/px; the limit is {MAX_MODEL_SCALE_TILE_PIXELS} px (send smaller tiles)")
        return None

    def new_job(self) -> SlideJob:
        return SlideJob(self)

    def close(self) -> None:
        self.backend.close()
        if self.red_cells:
            self.red_cells[1].close()
