"""A backend that plays a GPU backend where there is none, so the on-device probe loop runs on the CPU.

``EmulatedDeviceBackend`` wraps a host backend: its "device" arrays are numpy arrays, its kernels the
.cu sources compiled by g++ (``kernels.emulated.EmulatedDeviceKernels``), its denoiser the wrapped
backend's. The estimator drives it through the same ``DeviceLoop`` as a real GPU backend, which is how
tests/test_device_loop.py and ``benchmarks/gpu_check.py --cpu-dry-run`` check that code without a GPU.
Not offered by ``select.create_backend``: it computes nothing a user needs.
"""
from __future__ import annotations

import numpy as np

from cytoedge.kernels.emulated import EmulatedDeviceKernels
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.backends.checks import check_device_batch
from cytoedge.runtime.bundle import ModelBundle


class EmulatedDeviceBackend:
    """``inner``'s denoiser behind a ``DeviceLoop`` on numpy "device" arrays; counts host-interface calls
    (``host_calls``) and, through its kernels, every device→host copy (``kernels.downloads``)."""

    def __init__(self, bundle: ModelBundle, inner: DenoiserBackend, kernels: EmulatedDeviceKernels | None = None):
        self.bundle, self.inner = bundle, inner
        self.kernels = kernels or EmulatedDeviceKernels()
        self.name = f"emulated-device/{inner.name}"
        self.max_batch = inner.max_batch
        self.host_calls = 0

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        self.host_calls += 1
        return self.inner.predict_noise(x_t, timestep, class_id)

    def device_loop(self) -> "EmulatedDeviceBackend":
        return self

    def predict_noise_device(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        timestep, class_id = check_device_batch(x_t, timestep, class_id, self.bundle.denoiser_shape,
                                                self.bundle.num_class_ids, self.bundle.schedule.num_train_timesteps)
        return self.inner.predict_noise(x_t, timestep, class_id)

    def close(self) -> None:
        """The wrapped backend is its owner's to close."""
