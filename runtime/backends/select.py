"""Pick a denoiser backend by name, or the fastest one that works here ("auto").

auto = TensorRT (a cached engine for this bundle, GPU and TensorRT) > ONNX Runtime CUDA > ONNX Runtime
CPU; each backend passed over is logged with the reason. ``torch-cuda`` (PyTorch FP16 on a GPU, the probe
loop on the device with CuPy; written against the documented APIs and checked on the CPU through the
emulated kernels only, not yet run on a GPU) is chosen by name only. ``backend_availability`` gives the same
reasons to ``cytoedge doctor``.
"""
from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.backends.engine_cache import (current_platform, default_cache_dir, find_cached_engine,
                                                    tensorrt_source)
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "onnxruntime-cpu-int8", "torch",
                 "torch-cuda")


@dataclass(frozen=True)
class Availability:
    name: str
    available: bool
    reason: str
    engine: Path | None = None


def onnxruntime_conflict() -> str | None:
    """Both onnxruntime and onnxruntime-gpu installed: they overwrite each other's files; say how to fix it."""
    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(installed) < 2:
        return None
    return (f"both {installed[0]} and {installed[1]} are installed; they share the 'onnxruntime' module and the "
            "last one installed wins. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu "
            "(GPU machine) or pip install onnxruntime (CPU only)")


def tensorrt_availability(bundle: ModelBundle | None, cache_dir: Path | None = None) -> Availability:
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return Availability("tensorrt", False, f"tensorrt is not installed ({e}); pip install 'cytoedge[gpu]'")
    try:
        import pycuda.driver  # noqa: F401
    except ImportError as e:
        return Availability("tensorrt", False, f"pycuda is not installed ({e}); pip install 'cytoedge[gpu]'")
    try:
        platform = current_platform()
    except BackendError as e:
        return Availability("tensorrt", False, str(e))
    where = f"TensorRT {platform.tensorrt_version} on {platform.gpu_name} (sm {platform.compute_capability})"
    if bundle is None:
        return Availability("tensorrt", True, where)
    cache_dir = Path(cache_dir or default_cache_dir())
    engine = find_cached_engine(cache_dir, tensorrt_source(bundle), platform)
    if engine is None:
        return Availability("tensorrt", False, f"{where}, but no engine for this bundle in {cache_dir}; "
                                               f"run `cytoedge build-engine --model {bundle.path}`")
    return Availability("tensorrt", True, f"{where}, engine {engine.name}", engine)


def onnxruntime_cuda_availability() -> Availability:
    import onnxruntime as ort

    conflict = onnxruntime_conflict()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        reason = "this ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu in place of onnxruntime)"
        return Availability("onnxruntime-cuda", False, f"{reason}; {conflict}" if conflict else reason)
    return Availability("onnxruntime-cuda", True, f"ONNX Runtime {ort.__version__} lists CUDAExecutionProvider"
                        + (f" (warning: {conflict})" if conflict else ""))


def int8_availability(bundle: ModelBundle | None) -> Availability:
    """The bundle's INT8 graph may run only if it was quantised from this FP32 graph and decided like it
    on labelled cells (``cytoedge quantize``)."""
    name = "onnxruntime-cpu-int8"
    if bundle is None:
        return Availability(name, False, "no bundle given")
    net = bundle.manifest["networks"].get("denoiser_int8")
    if net is None:
        return Availability(name, False, f"the bundle has no INT8 graph; run `cytoedge quantize --model {bundle.path}`")
    fp32_sha = bundle.file_sha256(bundle.manifest["networks"]["denoiser"]["file"])
    if net.get("source_sha256") != fp32_sha:
        return Availability(name, False, "the INT8 graph was quantised from another FP32 graph; rerun `cytoedge quantize`")
    check = net.get("decision_check") or {}
    calibration = bundle.manifest.get("calibration")
    if calibration and check.get("calibration_sha256") != bundle.file_sha256(calibration):
        return Availability(name, False, "the bundle was recalibrated after the INT8 graph's decision check; rerun "
                                         f"`cytoedge quantize --model {bundle.path}`")
    if not check.get("passed"):
        return Availability(name, False, f"the INT8 graph did not pass its decision check (agreement "
                                         f"{check.get('agreement')} < bar {check.get('bar')}); FP32 is used")
    return Availability(name, True, f"INT8 convolutions, decisions {check['agreeing']}/{check['cells']} "
                                    f"= {check['agreement']:.4f} of FP32's on {check['data']}")


def backend_availability(bundle: ModelBundle | None = None, cache_dir: Path | None = None) -> list[Availability]:
    """Every backend, whether it can run here, and why (or why not)."""
    import onnxruntime as ort

    from cytoedge.runtime.backends.onnxruntime_backend import stream_plan

    streams, per_stream = stream_plan(None, None)
    cpu = f"ONNX Runtime {ort.__version__}; batches split over {streams} stream(s) × {per_stream} thread(s)"
    out = [tensorrt_availability(bundle, cache_dir), onnxruntime_cuda_availability(),
           Availability("onnxruntime-cpu", True, cpu), int8_availability(bundle)]
    try:
        import torch
    except ImportError as e:
        missing = f"torch is not installed ({e}); pip install 'cytoedge[torch]'"
        return out + [Availability("torch", False, missing), Availability("torch-cuda", False, missing)]
    out.append(Availability("torch", True, f"PyTorch {torch.__version__} (reference, eager CPU)"))
    return out + [torch_cuda_availability()]


def torch_cuda_availability() -> Availability:
    """PyTorch FP16 on CUDA; with CuPy its probe loop stays on the GPU (runtime/device_errors.py)."""
    import torch

    from cytoedge.kernels.cupy_runner import cupy_device_available

    if not torch.cuda.is_available():
        return Availability("torch-cuda", False, f"PyTorch {torch.__version__} sees no CUDA device")
    cupy_ok, cupy_why = cupy_device_available(torch.cuda.current_device())
    loop = "probe loop on the GPU (CuPy kernels)" if cupy_ok else f"probe loop on the host: {cupy_why}"
    return Availability("torch-cuda", True, f"PyTorch {torch.__version__} FP16 on {torch.cuda.get_device_name()}; "
                                            f"{loop}")


def create_backend(bundle: ModelBundle, name: str = "auto", threads: int | None = None,
                   max_batch: int = 256, engine: Path | None = None, cuda_graphs: bool = False,
                   streams: int | None = None) -> DenoiserBackend:
    """Create the named backend; "auto" takes the first that works of TensorRT, ORT CUDA, ORT CPU.
    ``threads`` and ``streams`` size the CPU backends (see ``OnnxRuntimeBackend``)."""
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES}")
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    if name == "torch":
        from cytoedge.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(bundle, max_batch=max_batch, threads=threads)
    if name == "torch-cuda":
        from cytoedge.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(bundle, max_batch=max_batch, device="cuda", precision="fp16")
    if name == "onnxruntime-cpu-int8":
        int8 = int8_availability(bundle)
        if not int8.available:
            raise BackendError(f"onnxruntime-cpu-int8 requested but unusable: {int8.reason}")
        return OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], threads, max_batch, precision="int8",
                                  streams=streams)
    if name in ("auto", "tensorrt"):
        trt = Availability("tensorrt", True, f"engine {engine} given", Path(engine)) if engine \
            else tensorrt_availability(bundle)
        if trt.available:
            from cytoedge.runtime.backends.tensorrt_backend import TensorRTBackend

            try:
                return TensorRTBackend(bundle, trt.engine, cuda_graphs=cuda_graphs)
            except BackendError as e:
                if name == "tensorrt":
                    raise
                log.warning("auto backend: TensorRT engine %s unusable, falling back: %s", trt.engine, e)
        elif name == "tensorrt":
            raise BackendError(f"tensorrt backend requested but unavailable: {trt.reason}")
        else:
            log.info("auto backend: not TensorRT: %s", trt.reason)
    if name in ("auto", "onnxruntime-cuda"):
        cuda = onnxruntime_cuda_availability()
        if cuda.available:
            backend = OnnxRuntimeBackend(bundle, ["CUDAExecutionProvider", "CPUExecutionProvider"], threads, max_batch)
            if backend.name != "onnxruntime-cuda":
                log.warning("CUDA provider listed but the session fell back to the CPU (missing CUDA libraries?)")
            return backend
        if name == "onnxruntime-cuda":
            raise BackendError(f"onnxruntime-cuda requested but unavailable: {cuda.reason}")
        log.info("auto backend: not ONNX Runtime CUDA: %s", cuda.reason)
    return OnnxRuntimeBackend(bundle, ["CPUExecutionProvider"], threads, max_batch, streams=streams)
