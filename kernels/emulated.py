"""The CUDA kernel sources compiled for the CPU (g++ + ``cuda_emulation.h``) and called over their grid.

This is how the .cu files are checked where there is no GPU: the very same source runs with
blockIdx/threadIdx as loop variables (``__syncthreads`` kernels with one OS thread per CUDA thread)
and must match the numpy twin. It is a test and benchmark tool, not a production path: it needs
a C++20 compiler and builds a shared library into a cache folder on first use.
``EmulatedDeviceKernels`` puts these kernels behind the device-array interface (device_ops.py) with
numpy arrays as the "device" ones, so the estimator's on-device loop runs, and is tested, on the CPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform
from cytoedge.kernels.cpu_twin import (check_alphas, check_dtype, check_noise_inputs, error_norm,
                                       kernel_inputs)
from cytoedge.kernels.device_ops import check_device_shapes

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
KERNEL_SOURCES = ("cell_batch.cu", "estimator_ops.cu")
EMULATION_HEADER = "cuda_emulation.h"
CXX_FLAGS = ("-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-fast-math")

_ENTRY_POINTS = r"""
#include "cell_batch.cu"
#include "estimator_ops.cu"

#define GRID unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz
#define PREPARE_ARGS const unsigned char* tiles, const long long* offsets, const int* heights, \
    const int* widths, const int* cell_tiles, const float* affines, const float* colour, int n_cells, int out_size

extern "C" void emu_prepare_cells_f32(GRID, PREPARE_ARGS, float* out, unsigned char* valid)
{
    emu_launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {
        prepare_cells_f32(tiles, offsets, heights, widths, cell_tiles, affines, colour, n_cells, out_size, out, valid);
    });
}

extern "C" void emu_prepare_cells_f16(GRID, PREPARE_ARGS, __half* out, unsigned char* valid)
{
    emu_launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {
        prepare_cells_f16(tiles, offsets, heights, widths, cell_tiles, affines, colour, n_cells, out_size, out, valid);
    });
}

extern "C" void emu_float2half(const float* values, __half* out, long long n)
{
    for (long long i = 0; i < n; ++i) {
        out[i] = __float2half_rn(values[i]);
    }
}

extern "C" void emu_add_noise_f32(GRID, const float* x0, const float* noise, const float* abar, int batch,
                                  int per_sample, int noise_shared, float* x_t)
{
    emu_launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {
        add_noise_f32(x0, noise, abar, batch, per_sample, noise_shared, x_t);
    });
}

extern "C" void emu_masked_weighted_error_f32(GRID, const float* eps_hat, const float* noise, const float* mask,
                                              const float* weights, int batch, int channels, int plane,
                                              int noise_shared, float inv_norm, float* out)
{
    emu_launch_cooperative(dim3(gx, gy, gz), dim3(bx, by, bz), [&] {
        masked_weighted_error_f32(eps_hat, noise, mask, weights, batch, channels, plane, noise_shared, inv_norm, out);
    });
}
"""


class EmulationUnavailable(RuntimeError):
    """No C++ compiler to build the emulated kernels with."""


def _cache_dir() -> Path:
    root = os.environ.get("CYTOEDGE_KERNEL_CACHE") or os.path.join(tempfile.gettempdir(), f"cytoedge-kernels-{os.getuid()}")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_emulated_library(compiler: str = "g++") -> Path:
    """Compile the .cu sources through the emulation header; cached by a hash of sources and flags."""
    exe = shutil.which(compiler)
    if exe is None:
        raise EmulationUnavailable(f"{compiler} not found: the emulated CUDA kernels need a C++20 compiler")
    digest = hashlib.sha256(_ENTRY_POINTS.encode() + " ".join(CXX_FLAGS).encode())
    for name in KERNEL_SOURCES + (EMULATION_HEADER,):
        digest.update((KERNEL_DIR / name).read_bytes())
    target = _cache_dir() / f"emulated-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source = Path(work) / "entry_points.cpp"
        source.write_text(_ENTRY_POINTS)
        built = Path(work) / target.name
        cmd = [exe, *CXX_FLAGS, "-I", str(KERNEL_DIR), str(source), "-o", str(built)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"building the emulated kernels failed ({' '.join(cmd)}):\n{result.stderr}")
        os.replace(built, target)
    log.info("built emulated CUDA kernels: %s", target)
    return target


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


class EmulatedKernels:
    """The CUDA kernels run on the CPU; methods mirror ``CudaPreprocessor`` plus launch geometry."""

    name = "cuda-emulated"

    def __init__(self, compiler: str = "g++"):
        self._lib = ctypes.CDLL(str(build_emulated_library(compiler)))

    def prepare_batch(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                      colour: ColourTransform = ColourTransform(), dtype: type = np.float32,
                      block: tuple[int, int] = (16, 16), max_grid_z: int = 65535) -> tuple[np.ndarray, np.ndarray]:
        """Run ``prepare_cells_{f32,f16}`` over its grid: ``(x [N,3,S,S], valid [N,S,S] uint8)``."""
        k = kernel_inputs(tiles, cells, out_size, colour)
        dt = check_dtype(dtype)
        n, size = k.cell_tiles.shape[0], int(out_size)
        out = np.empty((n, 3, size, size), np.float32 if dt == np.float32 else np.uint16)
        valid = np.empty((n, size, size), np.uint8)
        if n == 0:
            return out.view(dt), valid
        grid = (-(-size // block[0]), -(-size // block[1]), min(n, max_grid_z))
        fn = self._lib.emu_prepare_cells_f32 if dt == np.float32 else self._lib.emu_prepare_cells_f16
        fn(*[ctypes.c_uint(v) for v in (*grid, block[0], block[1], 1)],
           _ptr(k.tiles), _ptr(k.tile_offsets), _ptr(k.tile_heights), _ptr(k.tile_widths), _ptr(k.cell_tiles),
           _ptr(k.affines), _ptr(k.colour), ctypes.c_int(n), ctypes.c_int(size), _ptr(out), _ptr(valid))
        return out.view(dt), valid

    def float_to_half(self, values: np.ndarray) -> np.ndarray:
        """The emulation header's ``__float2half_rn`` over an array (checks it against numpy)."""
        values = np.ascontiguousarray(values, np.float32)
        out = np.empty(values.shape, np.uint16)
        self._lib.emu_float2half(_ptr(values), _ptr(out), ctypes.c_longlong(values.size))
        return out.view(np.float16)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray,
                  block: int = 256, grid: int = 64) -> np.ndarray:
        """Run ``add_noise_f32`` (grid-stride): ``x_t`` with the shape of ``x0``."""
        x0, noise, abar = check_noise_inputs(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
        check_alphas(abar)
        out = np.empty_like(x0)
        batch, per_sample = x0.shape[0], int(np.prod(x0.shape[1:], dtype=np.int64))
        self._lib.emu_add_noise_f32(*[ctypes.c_uint(v) for v in (grid, 1, 1, block, 1, 1)],
                                    _ptr(x0), _ptr(noise), _ptr(abar), ctypes.c_int(batch),
                                    ctypes.c_int(per_sample), ctypes.c_int(int(noise.shape[0] != batch)),
                                    _ptr(out))
        return out

    def masked_weighted_error(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                              weights: np.ndarray, block: int = 256, grid: int | None = None) -> np.ndarray:
        """Run ``masked_weighted_error_f32`` (one block per sample, block-wide reduction): ``[B] float32``."""
        eps_hat, noise, weights = check_noise_inputs(eps_hat, noise, weights, "weights")
        mask, inv_norm = error_norm(mask, eps_hat.shape)
        return self._error(eps_hat, noise, mask, weights, inv_norm, block, grid)

    def _error(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray, weights: np.ndarray, inv_norm: float,
               block: int, grid: int | None) -> np.ndarray:
        if block & (block - 1) or not 1 <= block <= 1024:
            raise ValueError(f"block must be a power of two in [1, 1024], got {block}")
        batch, channels = eps_hat.shape[:2]
        out = np.empty(batch, np.float32)
        if batch == 0:
            return out
        self._lib.emu_masked_weighted_error_f32(
            *[ctypes.c_uint(v) for v in (grid or batch, 1, 1, block, 1, 1)], _ptr(eps_hat), _ptr(noise), _ptr(mask),
            _ptr(weights), ctypes.c_int(batch), ctypes.c_int(channels), ctypes.c_int(mask.shape[0]),
            ctypes.c_int(int(noise.shape[0] != batch)), ctypes.c_float(inv_norm), _ptr(out))
        return out


class EmulatedDeviceKernels(EmulatedKernels):
    """``device_ops.DeviceKernels`` over numpy: the emulated .cu kernels as the CPU stand-in of a GPU runner.

    Counts what crosses "device→host" (``downloads``: the element count of each ``to_host``), so a test can
    check that the loop brings back one float per sample and nothing else. ``error_block`` is the error
    kernel's block size: each emulated block starts that many OS threads, so it is kept small here."""

    name = "cuda-emulated-device"
    xp = np

    def __init__(self, compiler: str = "g++", error_block: int = 32):
        super().__init__(compiler)
        self.error_block = error_block
        self.downloads: list[int] = []

    def to_device(self, array: np.ndarray) -> np.ndarray:
        return np.array(array)

    def to_host(self, array: np.ndarray) -> np.ndarray:
        self.downloads.append(int(np.size(array)))
        return np.array(array)

    def prepare_batch_device(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                             colour: ColourTransform = ColourTransform(),
                             dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        return self.prepare_batch(tiles, cells, out_size, colour, dtype)

    def add_noise_device(self, x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray) -> np.ndarray:
        check_device_shapes(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
        return self.add_noise(x0, noise, alphas_cumprod_at_t)

    def masked_weighted_error_device(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                                     weights: np.ndarray, inv_norm: float) -> np.ndarray:
        check_device_shapes(eps_hat, noise, weights, "weights")
        return self._error(np.ascontiguousarray(eps_hat), np.ascontiguousarray(noise), np.ascontiguousarray(mask),
                           np.ascontiguousarray(weights), inv_norm, self.error_block, None)
