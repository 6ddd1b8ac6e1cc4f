"""GPU runner for the CUDA kernels (pycuda): tiles resident on the device, buffers reused, one stream.

``CudaPreprocessor`` has the interface of ``cpu_twin.CpuPreprocessor`` (numpy in, numpy out) plus
``prepare_batch_on_device`` for a backend that reads the batch where it lies: pass the backend the
same ``stream`` (``stream.handle`` is the raw CUstream) and the returned device pointers.

It works in the device's primary context (``Device.retain_primary_context``), the one the CUDA
runtime — and so TensorRT and ONNX Runtime — use, so pointers and streams can be shared.
pycuda is imported lazily; without it (or without a GPU) construction raises ``CudaUnavailable``.
Verified here only as far as no GPU allows: the kernels compile to PTX and their g++ build matches
the twin (tests/test_kernels_*.py); this module's own test runs only where a GPU is present.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from cytoedge.kernels.cell_batch import ColourTransform
from cytoedge.kernels.cpu_twin import (cell_affines, check_alphas, check_cells, check_dtype, check_noise_inputs,
                                       check_out_size, colour_constants, error_norm, pack_tiles_for_kernel)

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).resolve().parent
PREPARE_BLOCK = (16, 16, 1)
REDUCE_BLOCK = 256
ELEMENTWISE_BLOCK = 256
MAX_GRID_Z = 65535


class CudaUnavailable(RuntimeError):
    """pycuda or a CUDA device is missing."""


def _import_pycuda():
    try:
        import pycuda.driver as cuda
        from pycuda.compiler import SourceModule
    except ImportError as missing:
        raise CudaUnavailable(f"the GPU preprocessor needs pycuda (pip install 'cytoedge[gpu]'): {missing}") from None
    return cuda, SourceModule


def cuda_device_available(device: int = 0) -> tuple[bool, str]:
    """Whether ``CudaPreprocessor(device)`` can start, and if not, why (for logs and test skips)."""
    try:
        cuda, _ = _import_pycuda()
    except CudaUnavailable as why:
        return False, str(why)
    try:
        cuda.init()
        count = cuda.Device.count()
    except cuda.Error as why:
        return False, f"CUDA driver unavailable: {why}"
    if device >= count:
        return False, f"CUDA device {device} requested, {count} present"
    return True, cuda.Device(device).name()


class _Grown:
    """A device allocation (or page-locked host buffer) that only grows, reused across batches."""

    def __init__(self, allocate):
        self._allocate, self.nbytes, self.mem = allocate, 0, None

    def at_least(self, nbytes: int):
        if nbytes > self.nbytes:
            self.mem, self.nbytes = self._allocate(max(nbytes, 2 * self.nbytes)), max(nbytes, 2 * self.nbytes)
        return self.mem


class CudaPreprocessor:
    """The kernels of cell_batch.cu / estimator_ops.cu on one GPU, sharing one CUDA stream."""

    name = "cuda"

    def __init__(self, device: int = 0, stream=None, ptx_dir: Path | None = None):
        """``stream``: a ``pycuda.driver.Stream`` shared with the backend (one is made if None).
        ``ptx_dir``: load ``<source>.ptx`` built ahead of time by ``nvcc -ptx`` instead of compiling."""
        cuda, source_module = _import_pycuda()
        ok, why = cuda_device_available(device)
        if not ok:
            raise CudaUnavailable(why)
        self._cuda = cuda
        self._context = cuda.Device(device).retain_primary_context()
        with self._active():
            self.stream = stream if stream is not None else cuda.Stream()
            self._staged = cuda.Event()  # recorded after each batch's uploads: staging may be reused
            modules = {name: self._load(name, source_module, ptx_dir) for name in ("cell_batch", "estimator_ops")}
            self._prepare = {np.dtype(np.float32): modules["cell_batch"].get_function("prepare_cells_f32"),
                             np.dtype(np.float16): modules["cell_batch"].get_function("prepare_cells_f16")}
            for fn in self._prepare.values():
                fn.prepare("PPPPPPPiiPP")
            self._add_noise = modules["estimator_ops"].get_function("add_noise_f32")
            self._add_noise.prepare("PPPiiiP")
            self._error = modules["estimator_ops"].get_function("masked_weighted_error_f32")
            self._error.prepare("PPPPiiiifP")
            self._device: dict[str, _Grown] = {}
            self._host: dict[str, _Grown] = {}
            self._tiles_key: tuple | None = None
            self._tiles_held: list[np.ndarray] = []

    @contextmanager
    def _active(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._context.pop()

    def _load(self, name: str, source_module, ptx_dir: Path | None):
        ptx = Path(ptx_dir) / f"{name}.ptx" if ptx_dir is not None else None
        if ptx is not None and ptx.exists():
            log.info("loading %s", ptx)
            return self._cuda.module_from_file(str(ptx))
        source = (KERNEL_DIR / f"{name}.cu").read_text()
        return source_module(source, no_extern_c=True, include_dirs=[str(KERNEL_DIR)])

    def _dev(self, key: str, nbytes: int) -> int:
        grown = self._device.setdefault(key, _Grown(self._cuda.mem_alloc))
        return int(grown.at_least(max(nbytes, 1)))

    def _pinned(self, key: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A page-locked host array of ``shape`` (a view of a reused, grow-only buffer)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        grown = self._host.setdefault(key, _Grown(lambda n: self._cuda.pagelocked_empty(n, np.uint8)))
        return grown.at_least(max(nbytes, 1))[:nbytes].view(dtype).reshape(shape)

    def _upload(self, key: str, array: np.ndarray) -> int:
        """Stage ``array`` in page-locked memory and enqueue its copy to the device buffer ``key``."""
        self._staged.synchronize()
        staged = self._pinned(key, array.shape, array.dtype)
        staged[...] = array
        ptr = self._dev(key, staged.nbytes)
        if staged.nbytes:
            self._cuda.memcpy_htod_async(ptr, staged, self.stream)
        return ptr

    def upload_tiles(self, tiles: list[np.ndarray]) -> None:
        """Copy the field tiles to the device once; later batches over the same tiles reuse them.

        Tiles are recognised by identity: after changing a tile in place, call this again."""
        flat, offsets, heights, widths = pack_tiles_for_kernel(tiles)
        with self._active():
            self._upload("tiles", flat)
            self._upload("tile_offsets", offsets)
            self._upload("tile_heights", heights)
            self._upload("tile_widths", widths)
            self._staged.record(self.stream)
        self._tiles_key, self._tiles_held = tuple(id(t) for t in tiles), list(tiles)

    def prepare_batch_on_device(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                                colour: ColourTransform = ColourTransform(),
                                dtype: type = np.float32) -> tuple[int, int, int]:
        """Enqueue the batch on ``self.stream``; returns ``(x_ptr, valid_ptr, n)`` device pointers to
        ``x [n,3,S,S]`` and ``valid [n,S,S] uint8``, valid until the next call (not synchronised)."""
        if self._tiles_key != tuple(id(t) for t in tiles):
            self.upload_tiles(tiles)
        cells = check_cells(cells, len(self._tiles_held))
        size, dt = check_out_size(out_size), check_dtype(dtype)
        n = cells.shape[0]
        with self._active():
            cell_tiles = self._upload("cell_tiles", cells[:, 0].astype(np.int32))
            affines = self._upload("affines", cell_affines(cells, size))
            consts = self._upload("colour", colour_constants(colour).reshape(-1))
            self._staged.record(self.stream)
            x = self._dev("x", n * 3 * size * size * dt.itemsize)
            valid = self._dev("valid", n * size * size)
            if n:
                grid = (-(-size // PREPARE_BLOCK[0]), -(-size // PREPARE_BLOCK[1]), min(n, MAX_GRID_Z))
                self._prepare[dt].prepared_async_call(
                    grid, PREPARE_BLOCK, self.stream, self._dev("tiles", 0), self._dev("tile_offsets", 0),
                    self._dev("tile_heights", 0), self._dev("tile_widths", 0), cell_tiles, affines, consts,
                    np.int32(n), np.int32(size), x, valid)
        return x, valid, n

    def prepare_batch(self, tiles: list[np.ndarray], cells: np.ndarray, out_size: int,
                      colour: ColourTransform = ColourTransform(),
                      dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Same result as ``cpu_twin.prepare_batch``, computed on the GPU and copied back."""
        dt = check_dtype(dtype)
        x_ptr, valid_ptr, n = self.prepare_batch_on_device(tiles, cells, out_size, colour, dt)
        size = int(out_size)
        with self._active():
            x = self._pinned("x_out", (n, 3, size, size), dt)
            valid = self._pinned("valid_out", (n, size, size), np.uint8)
            if n:
                self._cuda.memcpy_dtoh_async(x, x_ptr, self.stream)
                self._cuda.memcpy_dtoh_async(valid, valid_ptr, self.stream)
            self.stream.synchronize()
        return x.copy(), valid.copy()

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, alphas_cumprod_at_t: np.ndarray) -> np.ndarray:
        """``x_t = √ᾱ·x0 + √(1−ᾱ)·ε`` on the GPU (semantics of ``cpu_twin.add_noise``)."""
        x0, noise, abar = check_noise_inputs(x0, noise, alphas_cumprod_at_t, "alphas_cumprod_at_t")
        check_alphas(abar)
        batch, per_sample = x0.shape[0], int(np.prod(x0.shape[1:], dtype=np.int64))
        with self._active():
            ptrs = [self._upload(k, a) for k, a in (("x0", x0), ("noise", noise), ("abar", abar))]
            x_t = self._dev("x_t", x0.nbytes)
            out = self._pinned("x_t_out", x0.shape, np.float32)
            if x0.size:
                blocks = min(-(-x0.size // ELEMENTWISE_BLOCK), 65535)
                self._add_noise.prepared_async_call((blocks, 1), (ELEMENTWISE_BLOCK, 1, 1), self.stream, *ptrs,
                                                    np.int32(batch), np.int32(per_sample),
                                                    np.int32(noise.shape[0] != batch), x_t)
                self._cuda.memcpy_dtoh_async(out, x_t, self.stream)
            self.stream.synchronize()
        return out.copy()

    def masked_weighted_error(self, eps_hat: np.ndarray, noise: np.ndarray, mask: np.ndarray,
                              weights: np.ndarray) -> np.ndarray:
        """Per-sample weighted masked MSE on the GPU (semantics of ``cpu_twin.masked_weighted_error``)."""
        eps_hat, noise, weights = check_noise_inputs(eps_hat, noise, weights, "weights")
        mask, inv_norm = error_norm(mask, eps_hat.shape)
        batch, channels = eps_hat.shape[:2]
        with self._active():
            ptrs = [self._upload(k, a) for k, a in (("eps_hat", eps_hat), ("noise", noise), ("mask", mask),
                                                    ("weights", weights))]
            err = self._dev("error", batch * 4)
            out = self._pinned("error_out", (batch,), np.float32)
            if batch:
                self._error.prepared_async_call((min(batch, 65535), 1), (REDUCE_BLOCK, 1, 1), self.stream, *ptrs,
                                                np.int32(batch), np.int32(channels), np.int32(mask.shape[0]),
                                                np.int32(noise.shape[0] != batch), np.float32(inv_norm), err)
                self._cuda.memcpy_dtoh_async(out, err, self.stream)
            self.stream.synchronize()
        return out.copy()

    def close(self) -> None:
        """Free device buffers and release the primary context."""
        with self._active():
            self.stream.synchronize()
            self._device.clear()
            self._host.clear()
        self._tiles_key, self._tiles_held = None, []
        self._context.detach()
