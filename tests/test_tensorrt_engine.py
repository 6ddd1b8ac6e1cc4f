"""TensorRT engines: cache keys and sidecar refusals (run everywhere), engine build and backend (GPU only).

The GPU tests need an NVIDIA GPU with tensorrt>=10 and pycuda; without them they skip with the reason.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cytoedge.runtime.backends.engine_cache import (EngineKey, Platform, check_sidecar, engine_key, engine_paths,
                                                    find_cached_engine, read_sidecar, write_sidecar)
from cytoedge.runtime.backends.engine_spec import BatchProfile, denoiser_spec
from cytoedge.runtime.errors import BackendError

H100 = Platform("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")
A100 = Platform("10.3.0", "NVIDIA A100-SXM4-80GB", "8.0")


def test_profiles_cover_each_estimator_batch_with_the_smallest_profile():
    spec = denoiser_spec(32, batches=(64, 1, 8))
    assert [p.to_dict() for p in spec.profiles] == [{"min": 1, "opt": 1, "max": 1}, {"min": 2, "opt": 8, "max": 8},
                                                   {"min": 9, "opt": 64, "max": 64}]
    assert [spec.profile_for(b) for b in (1, 2, 8, 9, 64)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="outside every profile"):
        spec.profile_for(65)
    with pytest.raises(ValueError):
        BatchProfile(8, 4, 16)
    assert spec.dynamic_axes() == {"x_t": {0: "batch"}, "timestep": {0: "batch"}, "class_id": {0: "batch"},
                                   "eps": {0: "batch"}}
    assert spec.inputs[0].nbytes(4) == 4 * 3 * 32 * 32 * 4


def test_engine_key_changes_with_gpu_and_onnx(bundle):
    spec = denoiser_spec(bundle.input_size)
    k1 = engine_key(spec, bundle.denoiser_path, "fp16", H100)
    k2 = engine_key(spec, bundle.denoiser_path, "fp16", A100)
    k3 = EngineKey(k1.network, "f" * 64, k1.precision, H100, k1.profiles)
    k4 = engine_key(denoiser_spec(bundle.input_size, batches=(1, 16)), bundle.denoiser_path, "fp16", H100)
    paths = {engine_paths("/c", k)[0] for k in (k1, k2, k3, k4)}
    assert len(paths) == 4
    assert k1.onnx_sha256 == bundle.manifest["files"][bundle.denoiser_path.name]["sha256"]


def stand_in_engine(bundle, tmp_path, platform):
    """A file in an engine's place with the sidecar `build-engine` writes for it (no TensorRT here)."""
    spec = denoiser_spec(bundle.input_size)
    key = engine_key(spec, bundle.denoiser_path, "fp16", platform)
    engine = tmp_path / "denoiser.engine"
    engine.write_bytes(b"the engine as built")
    write_sidecar(engine, key, {"spec": spec.to_dict()})
    return spec, key, engine


def test_sidecar_mismatch_is_refused_naming_both_sides(bundle, tmp_path):
    spec, built, engine = stand_in_engine(bundle, tmp_path, A100)
    sidecar = read_sidecar(engine)
    check_sidecar(sidecar, built, engine)  # same machine: accepted
    here = engine_key(spec, bundle.denoiser_path, "fp16", Platform("10.7.0", H100.gpu_name, "9.0"))
    with pytest.raises(BackendError) as err:
        check_sidecar(sidecar, here, engine)
    msg = str(err.value)
    assert "A100" in msg and "H100" in msg and "10.7.0" in msg and "compute capability" in msg
    assert "cytoedge build-engine" in msg


def test_an_engine_file_changed_after_its_sidecar_is_refused(bundle, tmp_path):
    _, key, engine = stand_in_engine(bundle, tmp_path, A100)
    engine.write_bytes(b"the engine as built, then truncated or swapped")
    with pytest.raises(BackendError, match="engine file: sha256 .*changed or corrupted"):
        check_sidecar(read_sidecar(engine), key, engine)


def test_engine_without_sidecar_is_refused(tmp_path):
    (tmp_path / "x.engine").write_bytes(b"")
    with pytest.raises(BackendError, match="sidecar"):
        read_sidecar(tmp_path / "x.engine")


def test_cache_lookup_finds_only_engines_for_this_onnx_and_gpu(bundle, tmp_path):
    spec = denoiser_spec(bundle.input_size)
    for plat in (H100, A100):
        key = engine_key(spec, bundle.denoiser_path, "fp16", plat)
        engine, _ = engine_paths(tmp_path, key)
        engine.write_bytes(b"e")
        write_sidecar(engine, key, {})
    found = find_cached_engine(tmp_path, bundle.denoiser_path, A100)
    assert found is not None and json.loads(found.with_suffix(".json").read_text())["gpu_name"] == A100.gpu_name
    assert find_cached_engine(tmp_path, bundle.denoiser_path, Platform("10.3.0", "RTX 4090", "8.9")) is None


def _gpu_stack():
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed (no NVIDIA GPU stack here)")
    cuda = pytest.importorskip("pycuda.driver", reason="pycuda is not installed (no NVIDIA GPU stack here)")
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA device")
    except cuda.Error as e:
        pytest.skip(f"CUDA driver unusable: {e}")
    return trt, cuda


@pytest.fixture(scope="module")
def engine_bundle(bundle, tmp_path_factory):
    _gpu_stack()
    from cytoedge.export.export_bundle import export_bundle
    from cytoedge.export.tensorrt_engine import build_engine
    from cytoedge.runtime.bundle import ModelBundle

    out = tmp_path_factory.mktemp("trt")
    export_bundle(bundle.path, out / "bundle", batches=(1, 8, 64))
    new = ModelBundle.load(out / "bundle")
    engine = build_engine(new.network_path("denoiser_fp16"), denoiser_spec(new.input_size, batches=(1, 8, 64)),
                          out / "engines", optimisation_level=2, timing_cache=out / "timing.cache")
    return new, engine, out


def test_tensorrt_fp16_engine_matches_onnxruntime(engine_bundle):
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.backends.tensorrt_backend import TensorRTBackend

    new, engine, out = engine_bundle
    assert (out / "timing.cache").stat().st_size > 0
    ort_backend = OnnxRuntimeBackend(new)
    for graphs in (False, True):
        backend = TensorRTBackend(new, engine, cuda_graphs=graphs)
        rng = np.random.default_rng(0)
        for b in (1, 5, 8, 64, 70):  # 70 spans two calls
            x = rng.standard_normal((b, 3, new.input_size, new.input_size)).astype(np.float32)
            t, c = rng.integers(0, 1000, b), rng.integers(0, 8, b)
            err = np.abs(backend.predict_noise(x, t, c) - ort_backend.predict_noise(x, t, c)).max()
            assert err < 0.05, (graphs, b, err)
        backend.close()


def test_tensorrt_backend_refuses_engine_built_elsewhere(engine_bundle):
    from cytoedge.runtime.backends.tensorrt_backend import TensorRTBackend

    new, engine, out = engine_bundle
    side = engine.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["gpu_name"] = "Some Other GPU"
    forged = out / "forged.engine"
    forged.write_bytes(engine.read_bytes())
    forged.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="Some Other GPU"):
        TensorRTBackend(new, forged)


def test_infer_makes_the_engines_context_current_on_the_calling_thread(monkeypatch):
    """serve scores on worker threads: each infer pushes the engine's CUDA context on its own thread and pops
    it after, one infer at a time (a fake pycuda stands in for the driver; the GPU path itself is unverified here)."""
    import sys
    import threading
    import types

    from cytoedge.runtime.backends.tensorrt_backend import TensorRTBackend

    stacks: dict[int, list] = {}

    class FakeContext:
        def push(self):
            stacks.setdefault(threading.get_ident(), []).append(self)

    def pop():
        stacks[threading.get_ident()].pop()

    driver = types.SimpleNamespace(Context=types.SimpleNamespace(pop=pop), Error=RuntimeError)
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    backend = object.__new__(TensorRTBackend)
    backend._context, backend._lock = FakeContext(), threading.Lock()
    seen = []
    backend._infer = lambda feeds: seen.append(list(stacks.get(threading.get_ident(), []))) or {}
    worker = threading.Thread(target=backend.infer, args=({},))
    worker.start()
    worker.join()
    backend.infer({})
    assert [len(s) for s in seen] == [1, 1] and all(s[0] is backend._context for s in seen)
    assert all(not s for s in stacks.values())  # popped again on both threads
