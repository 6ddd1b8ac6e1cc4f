"""Batched preprocessing: cut, resample and normalise model inputs for many cells at once.

``prepare_batch`` is the CPU twin (numpy, cpu_twin.py); ``select_preprocessor`` returns the pycuda
runner of the same CUDA kernels (cuda_runner.py) where pycuda and a GPU are present, else the twin.
Both have ``prepare_batch``, ``add_noise`` and ``masked_weighted_error`` with the same semantics.
On device arrays (device_ops.py, the estimator's on-device probe loop): the CuPy runner of the same
kernels (cupy_runner.py) and, on the CPU, their g++ emulation (emulated.py).
"""
from __future__ import annotations

import logging

from cytoedge.kernels.cell_batch import CELL_FIELDS, ColourTransform, cell_table
from cytoedge.kernels.cpu_twin import CpuPreprocessor, add_noise, masked_weighted_error, prepare_batch

log = logging.getLogger(__name__)

__all__ = ["CELL_FIELDS", "ColourTransform", "CpuPreprocessor", "add_noise", "cell_table", "masked_weighted_error",
           "prepare_batch", "select_preprocessor"]


def select_preprocessor(prefer: str = "auto", threads: int = 1, device: int = 0, stream=None):
    """``prefer``: "auto" (GPU if pycuda and a device are present, else CPU), "cpu" or "cuda" (error if absent)."""
    if prefer not in ("auto", "cpu", "cuda"):
        raise ValueError(f"prefer must be 'auto', 'cpu' or 'cuda', got {prefer!r}")
    if prefer != "cpu":
        from cytoedge.kernels.cuda_runner import CudaPreprocessor, CudaUnavailable, cuda_device_available

        ok, why = cuda_device_available(device)
        if ok:
            return CudaPreprocessor(device=device, stream=stream)
        if prefer == "cuda":
            raise CudaUnavailable(why)
        log.info("preprocessing on the CPU twin: %s", why)
    return CpuPreprocessor(threads=threads)
