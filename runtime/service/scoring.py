"""What the daemon needs from a model: a factory of per-job scorers. The protocol, the journal and
delivery depend only on these two Protocols; scorer_binding.py adapts the real SlideScorer.

A job scorer must be deterministic: scoring the same slide (or the same tiles in the same order)
again yields byte-identical records. The daemon relies on it to resume a job after a crash — it
scores again, checks the records it had already journaled, and journals only the new ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np


class JobScorer(Protocol):
    """Scores one job. Raise CytoedgeError for a bad input (the job fails with that message)."""

    def score_path(self, path: Path, um_per_px: float | None) -> Iterator[dict]:
        """Cell records of a whole slide file, in a deterministic order, as they finish."""

    def score_tile(self, rgb: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        """Cell records of one in-band tile (``[H, W, 3]`` uint8, top-left at ``origin_xy`` slide px)."""

    def summary(self) -> dict:
        """Slide-level summary of everything scored so far (JSON-ready)."""


class ScorerFactory(Protocol):
    """Loaded once per daemon; hands out one JobScorer per job."""

    def identity(self) -> dict:
        """Model identity for HELLO: name, bundle_sha256, backend, estimator."""

    def new_job(self) -> JobScorer: ...

    def close(self) -> None: ...
