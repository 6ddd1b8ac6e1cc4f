"""The kernels on arrays that stay on a device: what an on-device probe loop calls.

A runner with this interface takes and returns arrays of its own library (``xp``): CuPy arrays for
``cupy_runner.CupyKernels`` on a GPU, numpy arrays for ``emulated.EmulatedDeviceKernels`` (the same
.cu sources compiled for the CPU), which lets the device loop's code run and be tested without a GPU.
Only ``to_host`` moves data device→host; its callers keep that to one float per sample.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform


@runtime_checkable
class DeviceKernels(Protocol):
    """``prepare_cells_*``, ``add_noise_f32`` and ``masked_weighted_error_f32`` on device arrays."""

    name: str
    xp: Any  # the device's array namespace (cupy, or numpy for the emulation)

    def to_device(self, array: np.ndarray) -> Any:
        """Copy a host array to the device."""
        ...

    def to_host(self, array: Any) -> np.ndarray:
        """Copy a device array to the host (the only device→host copy of the loop)."""
        ...

    def prepare_batch_device(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                             colour: ColourTransform = ColourTransform(), dtype: type = np.float32) -> tuple[Any, Any]:
        """``(x [N,3,S,S], valid [N,S,S] uint8)`` on the device (semantics of ``cpu_twin.prepare_batch``);
        tiles are uploaded once and kept while the same tile objects come back."""
        ...

    def add_noise_device(self, x0: Any, noise: Any, alphas_cumprod_at_t: Any) -> Any:
        """``x_t`` float32 (semantics of ``cpu_twin.add_noise``; ``noise`` ``[B or 1, ...]``)."""
        ...

    def masked_weighted_error_device(self, eps_hat: Any, noise: Any, mask: Any, weights: Any,
                                     inv_norm: float) -> Any:
        """``[B] float32`` (semantics of ``cpu_twin.masked_weighted_error``); ``mask`` float32 ``[H·W]`` and
        ``inv_norm`` as ``cpu_twin.error_norm`` returns them, computed once on the host."""
        ...


def check_device_shapes(x: Any, noise: Any, per_sample: Any, per_sample_name: str) -> None:
    """``check_noise_inputs`` on shapes and dtypes only (reading values would copy them to the host)."""
    if x.ndim < 1 or tuple(noise.shape[1:]) != tuple(x.shape[1:]) or noise.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"noise must have shape [B or 1, ...] matching {tuple(x.shape)}, got {tuple(noise.shape)}")
    if per_sample.ndim != 1 or per_sample.shape[0] != x.shape[0]:
        raise ValueError(f"{per_sample_name} must have one value per sample ({x.shape[0]}), got {tuple(per_sample.shape)}")
    for name, a in (("x", x), ("noise", noise), (per_sample_name, per_sample)):
        if np.dtype(a.dtype) != np.float32:
            raise ValueError(f"{name} must be float32 on the device, got {a.dtype}")
