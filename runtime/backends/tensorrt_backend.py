"""TensorRT backend: a cached FP16 engine run with pycuda buffers on one CUDA stream.

The engine's life is a sequence of named steps (as in TensorRT's demo/Diffusion):
``load`` (read the engine, check its sidecar against this GPU and TensorRT, deserialise) →
``activate`` (one execution context per optimisation profile) → ``allocate`` (device and pinned
host buffers for each profile's largest batch, once) → ``infer`` (copy in, ``execute_async_v3``
with tensor addresses, copy out, on one stream) → ``unload``. For batch sizes equal to a profile's
optimum, ``infer`` can replay a captured CUDA graph instead of enqueueing every kernel.

The CUDA context (the device's primary context) is made current on the calling thread around every
step, not only on the thread that loaded the engine: ``serve`` scores on worker threads. One lock
serialises ``infer``: the buffers and the stream are shared.

Written against the documented TensorRT 10 and pycuda APIs; CUDA-graph capture uses cuda-python's
runtime bindings (``cudaStreamBeginCapture``/``cudaGraphLaunch``), as TensorRT's demo does. None of
this can run on a machine without an NVIDIA GPU; see the tests for what is checked where.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cytoedge.runtime.backends.checks import check_batch, check_output
from cytoedge.runtime.backends.engine_cache import check_sidecar, current_platform, engine_key, read_sidecar
from cytoedge.runtime.backends.engine_spec import NetworkSpec
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)


def cuda_call(what: str, fn: Callable, *args: Any) -> Any:
    """Call a pycuda or cuda-python function; any CUDA failure becomes a BackendError naming ``what``.

    cuda-python returns ``(status, *values)`` tuples instead of raising: a non-zero status is raised
    here too, and the values are returned (one value unwrapped).
    """
    try:
        import pycuda.driver as cuda

        driver_error: type[BaseException] = cuda.Error
    except ImportError:
        driver_error = RuntimeError
    try:
        result = fn(*args)
    except driver_error as e:
        raise BackendError(f"CUDA error in {what}: {e}") from e
    if isinstance(result, tuple) and result and type(result[0]).__name__ in ("cudaError_t", "CUresult"):
        status, values = result[0], result[1:]
        if int(status) != 0:
            raise BackendError(f"CUDA error in {what}: {status!r}")
        return values[0] if len(values) == 1 else values
    return result


@dataclass
class _ProfileBuffers:
    """Device and pinned host memory for one profile, sized for its largest batch."""

    context: Any
    max_batch: int
    device: dict[str, Any] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    graphs: dict[int, Any] = field(default_factory=dict)  # batch → instantiated CUDA graph


class TensorRTBackend:
    """Runs the bundle's denoiser engine (see ``cytoedge build-engine``) on GPU 0."""

    def __init__(self, bundle: ModelBundle, engine_path: Path, cuda_graphs: bool = False):
        self.bundle = bundle
        self.engine_path = Path(engine_path)
        self.cuda_graphs = cuda_graphs
        self.name = "tensorrt"
        self.device_kind = "cuda"
        sidecar = read_sidecar(self.engine_path)
        self.spec = NetworkSpec.from_dict(sidecar["spec"])
        self.max_batch = max(p.max for p in self.spec.profiles)
        self._num_classes = bundle.num_class_ids
        self._engine = self._runtime = self._context = self._stream = self._cudart = None
        self._profiles: list[_ProfileBuffers] = []
        self._lock = threading.Lock()
        try:
            self.load(sidecar)
            with self._current():
                self.activate()
                self.allocate()
        except BaseException:  # what was made so far is freed, and the retained context released
            self.unload()
            raise

    @contextlib.contextmanager
    def _current(self):
        """The engine's CUDA context, current on this thread for the block (and popped after it)."""
        import pycuda.driver as cuda

        cuda_call("push context", self._context.push)
        try:
            yield
        finally:
            cuda_call("pop context", cuda.Context.pop)

    # --- engine life -------------------------------------------------------------------------
    def load(self, sidecar: dict) -> None:
        """Check the sidecar against this GPU/TensorRT and deserialise the engine."""
        import pycuda.driver as cuda
        import tensorrt as trt

        onnx_path = self.bundle.path / sidecar.get("onnx_file", self.bundle.denoiser_path.name)
        if not onnx_path.is_file():
            raise BackendError(f"{self.engine_path}: its ONNX source {onnx_path} is not in the bundle")
        check_sidecar(sidecar, engine_key(self.spec, onnx_path, sidecar.get("precision", "fp16"),
                                          current_platform()), self.engine_path)
        cuda_call("initialise CUDA", cuda.init)
        self._context = cuda_call("retain primary context", cuda.Device(0).retain_primary_context)
        with self._current():
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"TensorRT could not deserialise {self.engine_path}")
        log.info("loaded %s (%d profiles)", self.engine_path.name, self._engine.num_optimization_profiles)

    def activate(self) -> None:
        """One execution context per optimisation profile, all on one stream."""
        import pycuda.driver as cuda

        self._stream = cuda_call("create stream", cuda.Stream)
        self._profiles = []
        for index, profile in enumerate(self.spec.profiles):
            ctx = self._engine.create_execution_context()
            if ctx is None:
                raise BackendError(f"TensorRT could not create an execution context for profile {index}")
            if not ctx.set_optimization_profile_async(index, self._stream.handle):
                raise BackendError(f"TensorRT refused optimisation profile {index}")
            self._profiles.append(_ProfileBuffers(ctx, profile.max))

    def allocate(self) -> None:
        """Device buffers and pinned host buffers for each profile's largest batch, bound once."""
        import pycuda.driver as cuda
        import tensorrt as trt

        for buffers in self._profiles:
            for t in self.spec.inputs + self.spec.outputs:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(t.name)))
                shape = t.concrete(buffers.max_batch)
                buffers.host[t.name] = cuda_call("pagelocked_empty", cuda.pagelocked_empty, shape, dtype)
                buffers.device[t.name] = cuda_call("mem_alloc", cuda.mem_alloc, buffers.host[t.name].nbytes)
                if not buffers.context.set_tensor_address(t.name, int(buffers.device[t.name])):
                    raise BackendError(f"TensorRT refused the address of tensor {t.name!r}")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch (within one profile) and return the outputs as host arrays (any thread)."""
        with self._lock, self._current():
            return self._infer(feeds)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import pycuda.driver as cuda

        b = int(next(iter(feeds.values())).shape[0])
        buffers = self._profiles[self.spec.profile_for(b)]
        for t in self.spec.inputs:
            shape = t.concrete(b)
            if not buffers.context.set_input_shape(t.name, shape):
                raise BackendError(f"TensorRT refused input shape {shape} for {t.name!r}")
            host = buffers.host[t.name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
            host[...] = feeds[t.name]
            cuda_call(f"copy {t.name} to device", cuda.memcpy_htod_async, buffers.device[t.name], host, self._stream)
        if self.cuda_graphs and b in (p.opt for p in self.spec.profiles):
            self._launch_graph(buffers, b)
        elif not buffers.context.execute_async_v3(self._stream.handle):
            raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        outs = {}
        for t in self.spec.outputs:
            shape = t.concrete(b)
            host = buffers.host[t.name].reshape(-1)[:int(np.prod(shape))].reshape(shape)
            cuda_call(f"copy {t.name} to host", cuda.memcpy_dtoh_async, host, buffers.device[t.name], self._stream)
            outs[t.name] = host
        cuda_call("stream synchronize", self._stream.synchronize)
        return {k: v.astype(np.float32, copy=True) for k, v in outs.items()}

    def _launch_graph(self, buffers: _ProfileBuffers, batch: int) -> None:
        """Replay the CUDA graph for ``batch``, capturing it on first use (after one plain run)."""
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError as e:
                raise BackendError(f"CUDA graphs need cuda-python (pip install cuda-python): {e}") from e
        self._cudart = cudart
        stream = self._stream.handle
        if batch not in buffers.graphs:
            if not buffers.context.execute_async_v3(stream):  # TensorRT's lazy set-up must not be captured
                raise BackendError("TensorRT execute_async_v3 failed before CUDA-graph capture")
            cuda_call("cudaStreamBeginCapture", cudart.cudaStreamBeginCapture, stream,
                      cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal)
            if not buffers.context.execute_async_v3(stream):
                raise BackendError("TensorRT execute_async_v3 failed during CUDA-graph capture")
            graph = cuda_call("cudaStreamEndCapture", cudart.cudaStreamEndCapture, stream)
            buffers.graphs[batch] = cuda_call("cudaGraphInstantiate", cudart.cudaGraphInstantiate, graph, 0)
            log.info("captured a CUDA graph for batch %d", batch)
        cuda_call("cudaGraphLaunch", cudart.cudaGraphLaunch, buffers.graphs[batch], stream)

    def unload(self) -> None:
        """Free buffers, contexts, engine, and release the CUDA context."""
        if self._context is None:
            return
        with self._lock, self._current():
            for buffers in self._profiles:
                for graph in buffers.graphs.values():
                    cuda_call("cudaGraphExecDestroy", self._cudart.cudaGraphExecDestroy, graph)
                for mem in buffers.device.values():
                    mem.free()
            self._profiles = []
            self._engine = self._runtime = self._stream = None
        self._context.detach()
        self._context = None

    # --- DenoiserBackend ---------------------------------------------------------------------
    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        x_shape = self.spec.inputs[0].shape
        x_t, timestep, class_id = check_batch(x_t, timestep, class_id, (x_shape[1], x_shape[-1]), self._num_classes,
                                              self.bundle.schedule.num_train_timesteps)
        names = self.spec.input_names
        outs = []
        for s in range(0, x_t.shape[0], self.max_batch):
            part = (x_t[s:s + self.max_batch], timestep[s:s + self.max_batch], class_id[s:s + self.max_batch])
            outs.append(self.infer(dict(zip(names, part)))[self.spec.output_names[0]])
        return check_output(np.concatenate(outs), self.name)

    def close(self) -> None:
        self.unload()
