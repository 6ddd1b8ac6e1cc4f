"""The production job scorer: the daemon's ScorerFactory backed by slide_scoring.SlideScorer.

The model bundle and backend are loaded once (by the caller) and shared by every job; each job
gets its own SlideScorer, because a scorer accumulates one slide's state for its summary.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.slide_scoring import ScoringOptions, SlideScorer
from cytoedge.runtime.sources import open_source


class SlideJob:
    """One job's SlideScorer behind the daemon's JobScorer protocol."""

    def __init__(self, scorer: SlideScorer):
        self.scorer = scorer

    def score_path(self, path: Path, um_per_px: float | None) -> Iterator[dict]:
        source = open_source(path, um_per_px)
        try:
            yield from self.scorer.score_source(source)
        finally:
            source.close()

    def score_tile(self, rgb: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        return self.scorer.score_tile(rgb, origin_xy, um_per_px)

    def summary(self) -> dict:
        return self.scorer.summary()


class SlideScorerFactory:
    """Hands each job a SlideScorer over the shared bundle and backend."""

    def __init__(self, bundle: ModelBundle, backend: DenoiserBackend, estimator: str,
                 options: ScoringOptions = ScoringOptions()):
        self.bundle, self.backend, self.estimator, self.options = bundle, backend, estimator, options

    def identity(self) -> dict:
        """HELLO's model identity: the scorer's audit block (what `cytoedge score --json` records)."""
        audit = SlideScorer(self.bundle, self.backend, self.estimator, self.options).audit
        return {"name": self.bundle.name, **audit}

    def new_job(self) -> SlideJob:
        return SlideJob(SlideScorer(self.bundle, self.backend, self.estimator, self.options))

    def close(self) -> None:
        self.backend.close()
