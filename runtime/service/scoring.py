"""What the daemon needs from a model: a factory of per-job scorers. The protocol, the journal and
delivery depend only on these two Protocols; scorer_binding.py adapts the real SlideScorer.

A job scorer must be deterministic: scoring the same slide again yields byte-identical records.
The daemon relies on it to resume a path job after a crash — it scores again, checks the records
it had already journaled, and journals only the new ones. A stream job is not scored again: its
tile pixels are dropped once their cells are journaled, so the scorer hands the daemon a
``checkpoint()`` after every tile and is ``restore()``d from it and the journaled records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from cytoedge.runtime.sources import Opener


class JobScorer(Protocol):
    """Scores one job. Raise CytoedgeError for a bad input (the job fails with that message)."""

    def score_path(self, path: Path, um_per_px: float | None, opener: Opener) -> Iterator[dict]:
        """Cell records of a whole slide file or folder, in a deterministic order, as they finish;
        every file is opened through ``opener``."""

    def score_tile(self, rgb: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        """Cell records of one in-band tile (``[H, W, 3]`` uint8, top-left at ``origin_xy`` slide px)."""

    def summary(self) -> dict:
        """Slide-level summary of everything scored so far (JSON-ready)."""

    def checkpoint(self) -> dict:
        """JSON-ready state after the tiles scored so far (besides their records)."""

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        """Continue from a ``checkpoint()`` and the records journaled up to it."""


class ScorerFactory(Protocol):
    """Loaded once per daemon; hands out one JobScorer per job."""

    def identity(self) -> dict:
        """Model identity for HELLO: name, bundle_sha256, backend, estimator."""

    def tile_refusal(self, height: int, width: int, um_per_px: float) -> str | None:
        """Why a tile of this size and scale would exceed the scorer's limits, or None."""

    def new_job(self) -> JobScorer: ...

    def close(self) -> None: ...
