"""GPU runner for the CUDA kernels on CuPy: ``RawModule`` over the very .cu files the pycuda runner builds.

Two faces: ``device_ops.DeviceKernels`` on CuPy arrays (the estimator's on-device probe loop: tiles
uploaded once, only what the caller asks for comes back) and the host interface of
``cpu_twin.CpuPreprocessor`` (numpy in, numpy out) for checking it against the twin. Work is enqueued
on CuPy's current stream; a PyTorch tensor exchanged by DLPack is ordered by the protocol's stream
hand-off. CuPy is imported lazily: without it (or a GPU) construction raises ``CudaUnavailable``.
Not run here (no GPU): ``benchmarks/gpu_check.sh`` compares it with the twin on a GPU.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform
from cytoedge.kernels.cpu_twin import (cell_affines, check_alphas, check_cells, check_dtype, check_noise_inputs,
                                       check_out_size, colour_constants, error_norm, pack_tiles_for_kernel)
from cytoedge.kernels.cuda_runner import (ELEMENTWISE_BLOCK, KERNEL_DIR, MAX_GRID_Z, PREPARE_BLOCK, REDUCE_BLOCK,
                                          CudaUnavailable)
from cytoedge.kernels.device_ops import check_device_shapes

log = logging.getLogger(__name__)

COMPILERS = ("nvrtc", "nvcc")


def import_cupy():
    """The cupy module, or ``CudaUnavailable`` saying how to get it."""
    try:
        import cupy
    except ImportError as missing:
        raise CudaUnavailable(f"the CuPy kernel runner needs cupy (pip install 'cytoedge[torch-cuda]', which brings cupy-cuda12x): {missing}") from None
    return cupy


def cupy_device_available(device: int = 0) -> tuple[bool, str]:
    """Whether ``CupyKernels(device)`` can start, and if not, why (for logs, skips and gpu_check)."""
    try:
        cupy = import_cupy()
    except CudaUnavailable as why:
        return False, str(why)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as why:
        return False, f"CUDA runtime unavailable: {why}"
    if device >= count:
        return False, f"CUDA device {device} requested, {count} present"
    return True, cupy.cuda.runtime.getDeviceProperties(device)["name"].decode()


class CupyKernels:
    """The kernels of cell_batch.cu / estimator_ops.cu on one GPU through CuPy."""

    name = "cupy"

    def __init__(self, device: int = 0, compiler: str = "nvrtc"):
        """``compiler``: CuPy's ``RawModule`` backend, "nvrtc" (CuPy's default) or "nvcc"."""
        if compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}")
        ok, why = cupy_device_available(device)
        if not ok:
            raise CudaUnavailable(why)
        cupy = import_cupy()
        self.xp, self.device = cupy, cupy.cuda.Device(device)
        with self.device:
            modules = {name: cupy.RawModule(code=(KERNEL_DIR / f"{name}.cu").read_text(), backend=compiler,
                                            options=("-I" + str(KERNEL_DIR),))
                       for name in ("cell_batch", "estimator_ops")}
            self._prepare = {np.dtype(np.float32): modules["cell_batch"].get_function("prepare_cells_f32"),
                             np.dtype(np.float16): modules["cell_batch"].get_function("prepare_cells_f16")}
            self._add_noise = modules["estimator_ops"].get_function("add_noise_f32")
            self._error = modules["estimator_ops"].get_function("masked_weighted_error_f32")
        self._tiles_key: tuple | None = None
        self._tiles_held: list[np.ndarray] = []
        self._tiles_dev: tuple = ()
        self._tiles_lock = threading.Lock()  # serve's workers share a backend: upload and launch as one
        log.info("CUDA kernels compiled by CuPy (%s) on %s", compiler, cupy_device_available(device)[1])

    # --- device arrays (device_ops.DeviceKernels) ----------------------------------------------
    def to_device(self, array: np.ndarray) -> Any:
        with self.device:
            return self.xp.asarray(array)

    def to_host(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array)

    def upload_tiles(self, tiles: list[np.ndarray]) -> None:
        """Copy the field tiles to the device once; tiles are recognised by identity (as ``CudaPreprocessor``)."""
        self._tiles_dev = tuple(self.to_device(a) for a in pack_tiles_for_kernel(tiles))
        self._tiles_key, self._tiles_held = tuple(id(t) for t in tiles), list(tiles)

    def prepare_batch_device(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                             colour: ColourTransform = ColourTransform(), dtype: type = np.float32) -> tuple[Any, Any]:
        size, dt = check_out_size(out_size), check_dtype(dtype)
        xp = self.xp
        with self._tiles_lock, self.device:
            if self._tiles_key != tuple(id(t) for t in tiles):
                self.upload_tiles(tiles)
            cells = check_cells(cells, len(self._tiles_held))
            n = cells.shape[0]
            x = xp.empty((n, 3, size, size), dt)
            valid = xp.empty((n, size, size), xp.uint8)
            if n:
                cell_tiles = xp.asarray(cells[:, 0].astype(np.int32))
                affines = xp.asarray(cell_affines(cells, size))
                consts = xp.asarray(colour_constants(colour).reshape(-1))
                grid = (-(-size // PREPARE_BLOCK[0]), -(-size // PREPARE_BLOCK[1]), min(n, MAX_GRID_Z))
                self._prepare[dt](grid, PREPARE_BLOCK, (*self._tiles_dev, cell_tiles, affines, consts, np.int32(n),
                                                        np.int32(size), x, valid))
        return x, valid

    def add_noise_device(self, x0: Any, noise: Any, alphas_cumprod_at_t: Any) -> Any:
        check_device_shapes(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
        xp = self.xp
        with self.device:
            x0, noise, abar = (xp.ascontiguousarray(a) for a in (x0, noise, alphas_cumprod_at_t))
            x_t = xp.empty_like(x0)
            batch = x0.shape[0]
            per_sample = int(np.prod(x0.shape[1:], dtype=np.int64))
            if x0.size:
                blocks = min(-(-x0.size // ELEMENTWISE_BLOCK), 65535)
                self._add_noise((blocks,), (ELEMENTWISE_BLOCK,), (x0, noise, abar, np.int32(batch), np.int32(per_sample),
                                                                 np.int32(noise.shape[0] != batch), x_t))
        return x_t

    def masked_weighted_error_device(self, eps_hat: Any, noise: Any, mask: Any, weights: Any, inv_norm: float) -> Any:
        check_device_shapes(eps_hat, noise, weights, "weights")
        if eps_hat.ndim != 4 or mask.size != eps_hat.shape[2] * eps_hat.shape[3]:
            raise ValueError(f"eps_hat must be [B, C, H, W] and mask hold H·W values; got {tuple(eps_hat.shape)}, "
                             f"mask of {mask.size}")
        xp = self.xp
        with self.device:
            eps_hat, noise, mask, weights = (xp.ascontiguousarray(a, xp.float32) for a in (eps_hat, noise, mask, weights))
            batch, channels = eps_hat.shape[:2]
            out = xp.empty(batch, xp.float32)
            if batch:
                self._error((min(batch, 65535),), (REDUCE_BLOCK,), (eps_hat, noise, mask, weights, np.int32(batch),
                                                                    np.int32(channels), np.int32(mask.size),
                                                                    np.int32(noise.shape[0] != batch),
                                                                    np.float32(inv_norm), out))
        return out

    # --- host arrays (the interface of cpu_twin.CpuPreprocessor) -------------------------------
    def prepare_batch(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                      colour: ColourTransform = ColourTransform(),
                      dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Same result as ``cpu_twin.prepare_batch``, computed on the GPU and copied back."""
        x, valid = self.prepare_batch_device(tiles, cells, out_size, colour, dtype)
        return self.to_host(x), self.to_host(valid)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray) -> np.ndarray:
        x0, noise, abar = check_noise_inputs(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
        check_alphas(abar)
        return self.to_host(self.add_noise_device(*(self.to_device(a) for a in (x0, noise, abar))))

    def masked_weighted_error(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                              weights: np.ndarray) -> np.ndarray:
        eps_hat, noise, weights = check_noise_inputs(eps_hat, noise, weights, "weights")
        mask, inv_norm = error_norm(mask, eps_hat.shape)
        return self.to_host(self.masked_weighted_error_device(*(self.to_device(a) for a in (eps_hat, noise, mask,
                                                                                             weights)), inv_norm))

    def close(self) -> None:
        """Drop the tiles held on the device (CuPy's pool frees the memory)."""
        self._tiles_key, self._tiles_held, self._tiles_dev = None, [], ()
