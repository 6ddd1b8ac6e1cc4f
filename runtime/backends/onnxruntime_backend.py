"""ONNX Runtime backend: the embedded default (CPU), with the CUDA provider where one is present.

On the CPU a batch is split across several single-threaded sessions run side by side ("streams"),
rather than one session spreading each operator over all cores: the denoiser is many small
operators (a 32-px UNet), and per-operator thread hand-offs cost more than they gain. Measured on
2 cores, batch 64, INT8 graph, one run: one 2-thread session 112 ms, two 1-thread streams 87 ms
(benchmarks/RESULTS.md has the current figures). ONNX Runtime computes each sample independently
of the others in its batch, so the split changes no output bit (tests/test_backends.py).
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cytoedge.runtime.backends.checks import check_batch, check_output
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

MIN_SAMPLES_PER_STREAM = 8
"""A stream gets at least this many samples of a batch: below ~8 the per-sample cost of the CPU kernels rises."""

MAX_DEFAULT_STREAMS = 8
"""Default streams: the largest divisor of the core count up to this many (each stream holds its own
copy of the weights and activations); each stream then gets cores / streams intra-op threads."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or usable_cores()
    opts.inter_op_num_threads = 1
    return opts


def stream_plan(threads: int | None, streams: int | None) -> tuple[int, int]:
    """(streams, intra-op threads per stream) for ``threads`` CPU cores in all."""
    if threads is None:
        threads = usable_cores()
    if threads < 1:
        raise BackendError(f"threads must be ≥ 1, got {threads}")
    if streams is None:
        streams = max(d for d in range(1, min(threads, MAX_DEFAULT_STREAMS) + 1) if threads % d == 0)
    if not 1 <= streams <= threads:
        raise BackendError(f"streams must lie in [1, threads={threads}], got {streams}")
    return streams, threads // streams


def shard_bounds(batch: int, streams: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal slices of a batch, one per stream used (each ≥ MIN_SAMPLES_PER_STREAM)."""
    used = max(1, min(streams, batch // MIN_SAMPLES_PER_STREAM))
    edges = np.linspace(0, batch, used + 1).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


class OnnxRuntimeBackend:
    """Runs the bundle's ``denoiser.onnx`` (or another graph of the same contract: ``model_path``, or the
    bundle's INT8 graph with ``precision="int8"``) through ONNX Runtime: on the CPU as ``streams``
    sessions sharing ``threads`` cores (default: one single-threaded stream per core), on CUDA as one."""

    def __init__(self, bundle: ModelBundle, providers: list[str] | None = None, threads: int | None = None,
                 max_batch: int = 256, model_path: Path | None = None, precision: str = "fp32",
                 streams: int | None = None):
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise BackendError(f"ONNX Runtime precision must be 'fp32' or 'int8', got {precision!r}")
        self.bundle = bundle
        self.max_batch = max_batch
        if model_path is None and precision == "int8":
            model_path = bundle.network_path("denoiser_int8")
            if model_path is None:
                raise BackendError(f"{bundle.path} has no INT8 graph; run `cytoedge quantize --model {bundle.path}`")
        path = Path(model_path or bundle.denoiser_path)
        requested = providers or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime providers {missing} are not available here (available: {available})")
        cpu_only = requested == ["CPUExecutionProvider"]
        n_streams, per_stream = stream_plan(threads, streams) if cpu_only else (1, threads)
        try:
            self.sessions = [ort.InferenceSession(str(path), session_options(per_stream), providers=requested)
                             for _ in range(n_streams)]
        except Exception as e:  # ORT raises its own untyped errors for unreadable graphs
            raise BackendError(f"ONNX Runtime could not load {path}: {e}") from e
        # onnxruntime-gpu falls back to the CPU silently when CUDA libraries are missing: report what runs.
        self.providers = self.sessions[0].get_providers()
        self.device_kind = "cuda" if "CUDAExecutionProvider" in self.providers else "cpu"
        self.name = f"onnxruntime-{self.device_kind}" + ("-int8" if precision == "int8" else "")
        self.streams = n_streams
        self._pool = ThreadPoolExecutor(n_streams, thread_name_prefix="ort-stream") if n_streams > 1 else None
        log.info("ONNX Runtime on %s: providers %s, %d stream(s) × %s thread(s)", path.name, self.providers,
                 n_streams, per_stream)
        self._input_names = [i.name for i in self.sessions[0].get_inputs()]
        expected = ["x_t", "timestep", "class_id"]
        if self._input_names != expected:
            raise BackendError(f"{path}: inputs are {self._input_names}; the denoiser contract is {expected}")
        self._num_classes = bundle.num_class_ids

    def _run_chunk(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        def run(stream: int, lo: int, hi: int) -> np.ndarray:
            feed = {"x_t": x_t[lo:hi], "timestep": timestep[lo:hi], "class_id": class_id[lo:hi]}
            return self.sessions[stream].run(None, feed)[0]

        bounds = shard_bounds(x_t.shape[0], self.streams)
        if len(bounds) == 1:
            return run(0, *bounds[0])
        futures = [self._pool.submit(run, k, lo, hi) for k, (lo, hi) in enumerate(bounds)]
        return np.concatenate([f.result() for f in futures])

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        x_t, timestep, class_id = check_batch(x_t, timestep, class_id, self.bundle.denoiser_shape, self._num_classes,
                                              self.bundle.schedule.num_train_timesteps)
        outs = [self._run_chunk(x_t[s:s + self.max_batch], timestep[s:s + self.max_batch],
                                class_id[s:s + self.max_batch]) for s in range(0, x_t.shape[0], self.max_batch)]
        return check_output(np.concatenate(outs).astype(np.float32, copy=False), self.name)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self.sessions = []
