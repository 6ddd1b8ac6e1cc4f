"""The TensorRT engine cache: where engines live, the key each was built for, the sidecar that pins it.

A TensorRT engine only runs on the GPU model (compute capability) and TensorRT version it was
built with, and only computes the network it was built from. Each engine is stored next to a JSON
sidecar (ONNX sha256, TensorRT version, GPU name, compute capability, precision, profiles); loading
compares the sidecar with this machine and refuses any mismatch with a message naming both sides.
Engines are cached under a file name derived from those keys, so a changed key means a new engine.

The builder (export/tensorrt_engine.py) writes this format and the backend (tensorrt_backend.py)
reads it, so it lives with the backend. Only ``current_platform`` needs tensorrt and pycuda.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cytoedge.runtime.backends.engine_spec import NetworkSpec
from cytoedge.runtime.bundle import sha256_file
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".json"
ENGINE_SUFFIX = ".engine"
CACHE_ENV = "CYTOEDGE_ENGINE_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "cytoedge" / "engines"))


@dataclass(frozen=True)
class Platform:
    """What an engine is bound to on the machine that runs it."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; equal keys mean the cached engine can be reused."""

    network: str
    onnx_sha256: str
    precision: str
    platform: Platform
    profiles: tuple[tuple[int, int, int], ...]

    def to_dict(self) -> dict:
        return {"network": self.network, "onnx_sha256": self.onnx_sha256, "precision": self.precision,
                "tensorrt_version": self.platform.tensorrt_version, "gpu_name": self.platform.gpu_name,
                "compute_capability": self.platform.compute_capability,
                "profiles": [list(p) for p in self.profiles]}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def engine_key(spec: NetworkSpec, onnx_path: Path, precision: str, platform: Platform) -> EngineKey:
    return EngineKey(spec.name, sha256_file(Path(onnx_path)), precision, platform,
                     tuple((p.min, p.opt, p.max) for p in spec.profiles))


def engine_paths(cache_dir: Path, key: EngineKey) -> tuple[Path, Path]:
    """(engine file, sidecar file) for ``key`` in ``cache_dir``."""
    stem = f"{key.network}-{key.precision}-{key.digest()}"
    return Path(cache_dir) / (stem + ENGINE_SUFFIX), Path(cache_dir) / (stem + SIDECAR_SUFFIX)


# sidecar field → what a mismatch means, in the words the refusal uses
_CHECKED_FIELDS = (("onnx_sha256", "ONNX graph"), ("tensorrt_version", "TensorRT version"),
                   ("gpu_name", "GPU"), ("compute_capability", "compute capability"), ("precision", "precision"),
                   ("profiles", "optimisation profiles"))


def check_sidecar(sidecar: dict, expected: EngineKey, engine_path: Path) -> None:
    """Raise BackendError naming every field where the engine's sidecar differs from this machine,
    and if the engine file is not the one the sidecar was written for (its sha256)."""
    want = expected.to_dict()
    wrong = [f"{label}: engine has {sidecar.get(field)!r}, this machine needs {want[field]!r}"
             for field, label in _CHECKED_FIELDS if sidecar.get(field) != want[field]]
    actual = sha256_file(Path(engine_path))
    if sidecar.get("engine_sha256") != actual:
        wrong.append(f"engine file: sha256 {actual[:12]}… but the sidecar records "
                     f"{str(sidecar.get('engine_sha256'))[:12]}… (changed or corrupted since it was built)")
    if wrong:
        raise BackendError(f"{engine_path}: TensorRT engine does not match this machine ({'; '.join(wrong)}); "
                           "rebuild it here with `cytoedge build-engine`")


def read_sidecar(engine_path: Path) -> dict:
    side = Path(engine_path).with_suffix(SIDECAR_SUFFIX)
    if not side.is_file():
        raise BackendError(f"{engine_path}: sidecar {side.name} is missing; an engine without one cannot be checked "
                           "against this GPU and TensorRT — rebuild it with `cytoedge build-engine`")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise BackendError(f"{side}: not valid JSON ({e})") from None


def write_sidecar(engine_path: Path, key: EngineKey, extra: dict) -> Path:
    side = Path(engine_path).with_suffix(SIDECAR_SUFFIX)
    side.write_text(json.dumps({**key.to_dict(), **extra, "engine_sha256": sha256_file(engine_path),
                                "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
                               indent=2) + "\n")
    return side


def current_platform() -> Platform:
    """TensorRT version and GPU 0's name and compute capability (needs tensorrt and pycuda)."""
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"TensorRT engines need the 'gpu' extra (tensorrt, pycuda): {e}") from e
    from cytoedge.runtime.backends.tensorrt_backend import cuda_call

    cuda_call("cuInit", cuda.init)
    if cuda_call("cuDeviceGetCount", cuda.Device.count) == 0:
        raise BackendError("no CUDA device found")
    dev = cuda_call("cuDeviceGet", cuda.Device, 0)
    major, minor = dev.compute_capability()
    return Platform(trt.__version__, dev.name(), f"{major}.{minor}")


def tensorrt_source(bundle) -> Path:
    """The ONNX graph engines are built from: the bundle's FP16 denoiser where exported, else the FP32 one."""
    return bundle.network_path("denoiser_fp16") or bundle.denoiser_path


def find_cached_engine(cache_dir: Path, onnx_path: Path, platform: Platform) -> Path | None:
    """A cached engine built from ``onnx_path`` for this platform, or None (newest first)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return None
    digest = sha256_file(Path(onnx_path))
    want = {"onnx_sha256": digest, "tensorrt_version": platform.tensorrt_version, "gpu_name": platform.gpu_name,
            "compute_capability": platform.compute_capability}
    for side in sorted(cache_dir.glob("*" + SIDECAR_SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            meta = json.loads(side.read_text())
        except json.JSONDecodeError:
            log.warning("ignoring unreadable sidecar %s", side)
            continue
        engine = side.with_suffix(ENGINE_SUFFIX)
        if all(meta.get(k) == v for k, v in want.items()) and engine.is_file():
            return engine
    return None
