"""Support for the scanner-link tests (no tests here).

``PixelStatsScorer`` is a TEST-ONLY deterministic scorer for protocol and delivery tests: each
"cell" is one 16×16 block of the submitted pixels and its record holds real statistics of those
pixels (mean RGB, standard deviation, a bright/dark label). It lets the tests check delivery
cell for cell against numbers computed independently, fast, without the model. The end-to-end
test (test_service_model.py) uses the real SlideScorer.

Run as a script, it is a daemon for the kill -9 test: ``python test_service_support.py CONFIG DELAY_S``.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np

from cytoedge.runtime.cells import read_rgb
from cytoedge.runtime.errors import InputImageError

BLOCK = 16
POISON_ORIGIN = (6666, 6666)  # a tile placed here kills the daemon process while it is scored (TEST-ONLY)


def block_records(rgb: np.ndarray, origin_xy: tuple[int, int]) -> list[dict]:
    """One record per whole BLOCK×BLOCK block, raster order: what PixelStatsScorer reports."""
    records = []
    h, w = rgb.shape[:2]
    for y in range(0, h - BLOCK + 1, BLOCK):
        for x in range(0, w - BLOCK + 1, BLOCK):
            block = rgb[y:y + BLOCK, x:x + BLOCK].astype(np.float64)
            mean = block.reshape(-1, 3).mean(0)
            records.append({"x": origin_xy[0] + x + BLOCK // 2, "y": origin_xy[1] + y + BLOCK // 2,
                            "mean_rgb": [round(float(m), 4) for m in mean], "std": round(float(block.std()), 4),
                            "class": "bright" if mean.mean() >= 128 else "dark"})
    return records


class PixelStatsJob:
    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.counts = {"bright": 0, "dark": 0}

    def _count(self, records: list[dict]) -> list[dict]:
        for r in records:
            self.counts[r["class"]] += 1
        return records

    def score_path(self, path: Path, um_per_px: float | None, opener):
        if path.suffix == ".bad":
            raise InputImageError(f"{path}: not a slide this scorer reads")
        with opener(path) as readable:
            rgb = read_rgb(readable)
        for record in block_records(rgb, (0, 0)):
            if self.delay_s:
                time.sleep(self.delay_s)
            yield self._count([record])[0]

    def score_tile(self, rgb: np.ndarray, origin_xy: tuple[int, int], um_per_px: float) -> list[dict]:
        if tuple(origin_xy) == POISON_ORIGIN:  # what a segfault in a decoder or an OOM kill does to the daemon
            os.kill(os.getpid(), signal.SIGKILL)
        if self.delay_s:
            time.sleep(self.delay_s)
        return self._count(block_records(rgb, origin_xy))

    def summary(self) -> dict:
        return {"cells": sum(self.counts.values()), "classes": dict(self.counts)}

    def checkpoint(self) -> dict:
        return {"counts": dict(self.counts)}

    def restore(self, checkpoint: dict, records: list[dict]) -> None:
        self.counts = dict(checkpoint["counts"])


class PixelStatsScorer:
    """TEST-ONLY ScorerFactory (see the module docstring)."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def identity(self) -> dict:
        return {"name": "pixel-stats-test-scorer", "bundle_sha256": "0" * 64, "backend": "numpy",
                "estimator": "block-statistics"}

    def tile_refusal(self, height: int, width: int, um_per_px: float) -> str | None:
        return None

    def new_job(self) -> PixelStatsJob:
        return PixelStatsJob(self.delay_s)

    def close(self) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str]) -> int:
    import logging

    from cytoedge.runtime.service.config import JsonLogFormatter, load_config
    from cytoedge.runtime.service.daemon import Daemon

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    config = load_config(Path(argv[0]), {})
    daemon = Daemon(config, PixelStatsScorer(float(argv[1])))
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    daemon.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
