"""Input and output checks shared by every backend, so each refuses bad batches the same way."""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.errors import BackendError


def check_batch(x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray, shape: tuple[int, int], num_classes: int,
                num_timesteps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and convert one denoiser batch to the contract's dtypes (``shape`` = (channels, size))."""
    x_t = np.ascontiguousarray(x_t, dtype=np.float32)
    channels, size = shape
    if x_t.ndim != 4 or x_t.shape[1:] != (channels, size, size):
        raise BackendError(f"x_t has shape {x_t.shape}; expected [B, {channels}, {size}, {size}]")
    timestep, class_id = check_ids(x_t.shape[0], timestep, class_id, num_classes, num_timesteps)
    return x_t, timestep, class_id


def check_device_batch(x_t, timestep: np.ndarray, class_id: np.ndarray, shape: tuple[int, int], num_classes: int,
                       num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """``check_batch`` for an ``x_t`` on a device: its shape and dtype only, the host ids in full."""
    channels, size = shape
    if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (channels, size, size) or np.dtype(x_t.dtype) != np.float32:
        raise BackendError(f"x_t is {x_t.dtype} {tuple(x_t.shape)}; expected float32 [B, {channels}, {size}, {size}]")
    return check_ids(int(x_t.shape[0]), timestep, class_id, num_classes, num_timesteps)


def check_ids(b: int, timestep: np.ndarray, class_id: np.ndarray, num_classes: int,
              num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the host-side timesteps and class ids of a ``b``-sample batch (x_t may be on a device)."""
    if b == 0:
        raise BackendError("empty batch: x_t has 0 samples")
    timestep = np.ascontiguousarray(timestep, dtype=np.int64).reshape(-1)
    class_id = np.ascontiguousarray(class_id, dtype=np.int64).reshape(-1)
    if timestep.shape != (b,) or class_id.shape != (b,):
        raise BackendError(f"timestep {timestep.shape} and class_id {class_id.shape} must both be [{b}]")
    if timestep.min() < 0 or timestep.max() >= num_timesteps:
        raise BackendError(f"timestep values must lie in [0, {num_timesteps - 1}]")
    if class_id.min() < 0 or class_id.max() >= num_classes:
        raise BackendError(f"class_id values must lie in [0, {num_classes - 1}]")
    return timestep, class_id


def check_output(eps: np.ndarray, backend: str) -> np.ndarray:
    if not np.all(np.isfinite(eps)):
        bad = int((~np.isfinite(eps)).reshape(eps.shape[0], -1).any(1).sum())
        raise BackendError(f"{backend} returned NaN/Inf for {bad} of {eps.shape[0]} samples")
    return eps
