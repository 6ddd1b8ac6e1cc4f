"""Pick a denoiser backend by name, or the fastest one that works here ("auto")."""
from __future__ import annotations

import logging

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "onnxruntime-cpu", "onnxruntime-cuda", "torch")


def create_backend(bundle: ModelBundle, name: str = "auto", threads: int | None = None,
                   max_batch: int = 256) -> DenoiserBackend:
    """Create the named backend; "auto" tries ONNX Runtime CUDA, then falls back to CPU with a log line."""
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    if name == "torch":
        from cytoedge.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(bundle, max_batch=max_batch, threads=threads)
    if name in ("auto", "onnxruntime-cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            backend = OnnxRuntimeBackend(bundle, ["CUDAExecutionProvider", "CPUExecutionProvider"], threads, max_batch)
            if backend.name == "onnxruntime-cuda":
                return backend
            log.warning("CUDA provider listed but the session fell back to the CPU (missing CUDA libraries?)")
            return backend
        if name == "onnxruntime-cuda":
            raise BackendError("onnxruntime-cuda requested, but this ONNX Runtime has no CUDAExecutionProvider "
                               "(install onnxruntime-gpu in place of onnxruntime; see README)")
    return OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], threads, max_batch)
