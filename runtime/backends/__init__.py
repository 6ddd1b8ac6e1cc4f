"""Denoiser backends: one interface (predict the noise for a batch), several implementations.

The estimators drive any object with this shape; they never know which engine runs underneath.
A backend whose arrays live on a device may also offer a ``DeviceLoop`` (``device_loop()``): the
estimator then keeps its probe loop there (runtime/device_errors.py); one without it, or returning
None, gets the host loop.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cytoedge.kernels.device_ops import DeviceKernels


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


@runtime_checkable
class DeviceLoop(Protocol):
    """What a backend on a device lends the estimator so that x_t, ε̂ and the errors never leave it:
    kernels on that device's arrays and the denoiser on them."""

    kernels: DeviceKernels

    def predict_noise_device(self, x_t: Any, timestep: np.ndarray, class_id: np.ndarray) -> Any:
        """ε̂ float32 ``[B,3,H,W]`` on the device for ``x_t`` there; ``timestep`` and ``class_id`` are host
        arrays (checked like ``check_batch``). Non-finite output is not looked for here (that would copy
        it back): the race refuses the non-finite errors it makes."""
        ...


def backend_device(backend: DenoiserBackend) -> str:
    """Where the backend computes: "cuda" or "cpu" (a backend's optional ``device_kind``; absent: cpu).
    What runs beside the denoiser (a latent bundle's encoder) follows it."""
    return str(getattr(backend, "device_kind", "cpu"))


def device_loop_of(backend: DenoiserBackend) -> DeviceLoop | None:
    """The backend's device loop, or None where it has none (a CPU backend, or CuPy missing)."""
    offer = getattr(backend, "device_loop", None)
    return offer() if callable(offer) else None
