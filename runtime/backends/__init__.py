"""Denoiser backends: one interface (predict the noise for a batch), several implementations.

The estimators drive any object with this shape; they never know which engine runs underneath.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DenoiserBackend(Protocol):
    """ε_θ(x_t, t, c) for a batch: ``x_t [B,3,H,W] float32``, ``t [B] int64``, ``class_id [B] int64``."""

    name: str
    max_batch: int

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        """Return ε̂ ``[B,3,H,W] float32``; raises BackendError on non-finite output."""
        ...

    def close(self) -> None:
        ...
