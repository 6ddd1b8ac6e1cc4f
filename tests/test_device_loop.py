"""The estimator's on-device probe loop, run on the CPU: the emulated .cu kernels (g++) stand in for CUDA and
``EmulatedDeviceBackend`` for a GPU backend, so the very ``DeviceErrorSource`` code a GPU runs is run here.

Tolerances: the cut is the kernels' (bit-equal to the twin but for rare one-grey-level rounding steps,
tests/test_kernels_cuda_source.py), noising is bit-equal, the error a float32 block reduction against
the twin's float64 sum (relative 1e-5); so errors agree to ~1e-5 and the race's decisions exactly.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from cytoedge.kernels.emulated import EmulatedDeviceKernels, EmulationUnavailable
from cytoedge.runtime.backends import device_loop_of
from cytoedge.runtime.backends.emulated_device import EmulatedDeviceBackend
from cytoedge.runtime.device_errors import DeviceErrorSource
from cytoedge.runtime.errors import BackendError
from cytoedge.runtime.estimator import (DenoiserErrorSource, error_source_for, estimate, noise_bank,
                                        probes_from_calibration)

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope="module")
def device_kernels() -> EmulatedDeviceKernels:
    try:
        return EmulatedDeviceKernels()
    except EmulationUnavailable as why:
        pytest.skip(f"no C++ compiler for the emulated kernels: {why}")


@pytest.fixture
def fake(bundle, ort_backend, device_kernels) -> EmulatedDeviceBackend:
    device_kernels.downloads.clear()
    return EmulatedDeviceBackend(bundle, ort_backend, device_kernels)


def test_device_errors_equal_the_host_loops(generated_batch, bundle, ort_backend, fake):
    probes, _ = probes_from_calibration(bundle)
    noise = noise_bank(bundle)
    host = DenoiserErrorSource(generated_batch, bundle, ort_backend, probes, noise)
    dev = DeviceErrorSource(generated_batch, bundle, fake, probes, noise)
    for view, i in host.view_index.items():
        same = dev.x0[dev.view_index[view]] == host.x0[i]
        assert same.mean() > 0.999  # the same cut but for rare one-grey-level steps
        np.testing.assert_allclose(dev.x0[dev.view_index[view]], host.x0[i], rtol=0, atol=1.01 * 2 / 255)
    n, k = len(generated_batch), bundle.num_class_ids
    cells, classes = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
    for j in range(min(3, len(probes))):
        before = len(fake.kernels.downloads)
        got = dev(cells, classes, j)
        assert fake.kernels.downloads[before:] == [cells.size]  # one float per (cell, class) comes back
        assert got.dtype == np.float64 and got.shape == (cells.size,)
        np.testing.assert_allclose(got, host(cells, classes, j), rtol=1e-5)
    assert fake.host_calls == 0


def test_estimate_runs_the_device_loop_and_decides_as_the_host(generated_batch, bundle, ort_backend, fake):
    host = estimate(generated_batch, bundle, ort_backend)
    dev = estimate(generated_batch, bundle, fake)
    assert fake.host_calls == 0 and fake.kernels.downloads
    assert sum(fake.kernels.downloads) == host.nfe.sum()  # nothing but the errors came back
    np.testing.assert_array_equal(dev.nfe, host.nfe)
    np.testing.assert_array_equal(dev.probes_run, host.probes_run)
    np.testing.assert_array_equal(dev.gaps.argmin(1), host.gaps.argmin(1))
    np.testing.assert_allclose(dev.gaps, host.gaps, rtol=1e-4, atol=1e-7)


def test_score_reaches_the_device_loop_and_gives_the_same_records(bundle, ort_backend, device_kernels, tmp_path,
                                                                  monkeypatch, capsys):
    """`cytoedge score` with a GPU backend selected (here the emulated one, by a patched selection) runs the
    device loop and writes the records the host loop writes."""
    import cytoedge.runtime.backends.select as select
    from cytoedge.runtime.cli import main
    from cytoedge.runtime.synthetic_smear import SmearSpec, generate_smear

    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=3, ddim_steps=4, seed=5))
    png = tmp_path / "smear.png"
    cv2.imwrite(str(png), cv2.cvtColor(smear.rgb, cv2.COLOR_RGB2BGR))
    args = ["--um-per-px", str(smear.um_per_px), "--threads", "1", "--no-heatmaps", "--quiet", "--no-red-cells",
            "--no-run-log", "--json"]

    def score(name: str) -> list[dict]:
        assert main(["score", str(png), "--out", str(tmp_path / name), *args]) == 0
        return json.loads(capsys.readouterr().out)["slides"][0]["cells"]

    host = score("host")
    real = select.create_backend
    made = []

    def gpu_backend(b, name="auto", threads=None, **kw):
        made.append(EmulatedDeviceBackend(b, real(b, "onnxruntime-cpu", threads=threads), device_kernels))
        return made[-1]

    monkeypatch.setattr(select, "create_backend", gpu_backend)
    device_kernels.downloads.clear()
    dev = score("device")
    assert made and made[0].host_calls == 0 and device_kernels.downloads
    assert len(dev) == len(host) >= 1
    for d, h in zip(dev, host):
        assert (d["id"], d["class"], d["nfe"], d["prediction_set"]) == (h["id"], h["class"], h["nfe"],
                                                                       h["prediction_set"])
        for name, p in h["probabilities"].items():
            assert d["probabilities"][name] == pytest.approx(p, abs=1e-4)


def test_a_latent_bundle_keeps_the_host_loop(bundle, generated_batch, fake, monkeypatch, caplog):
    import cytoedge.runtime.estimator as estimator
    from cytoedge.runtime.encoders import PixelSpace

    manifest = copy.deepcopy(bundle.manifest)
    manifest["latent"] = {"channels": 3, "size": bundle.input_size}
    latent = dataclasses.replace(bundle, manifest=manifest)
    monkeypatch.setattr(estimator, "create_encoder", lambda b, backend=None: PixelSpace())
    probes, _ = probes_from_calibration(bundle)
    with caplog.at_level(logging.INFO, logger="cytoedge.runtime.estimator"):
        source = error_source_for(generated_batch, latent, fake, probes, noise_bank(bundle))
    assert isinstance(source, DenoiserErrorSource)
    assert "latent bundle" in caplog.text and "probe loop on the host" in caplog.text
    with pytest.raises(BackendError, match="latent bundle"):
        DeviceErrorSource(generated_batch, latent, fake, probes, noise_bank(bundle))


def test_cpu_backends_offer_no_device_loop(ort_backend):
    assert device_loop_of(ort_backend) is None


def test_device_loop_refuses_bad_batches(bundle, fake):
    s = bundle.input_size
    x = np.zeros((2, 3, s, s), np.float32)
    with pytest.raises(BackendError, match="class_id values"):
        fake.predict_noise_device(x, np.array([1, 2]), np.array([0, 99]))
    with pytest.raises(BackendError, match="expected float32"):
        fake.predict_noise_device(x.astype(np.float64), np.array([1, 2]), np.array([0, 1]))


def test_torch_backend_on_the_cpu_has_no_device_loop_and_refuses_what_it_cannot_run(bundle):
    torch = pytest.importorskip("torch", reason="the PyTorch backend needs the torch extra")
    from cytoedge.runtime.backends.torch_backend import TorchBackend

    cpu = TorchBackend(bundle, threads=1)
    assert cpu.name == "torch-cpu" and cpu.device_loop() is None
    with pytest.raises(BackendError, match="FP16 needs a CUDA device"):
        TorchBackend(bundle, precision="fp16")
    with pytest.raises(BackendError, match="precision"):
        TorchBackend(bundle, precision="int4")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="sees no CUDA device"):
            TorchBackend(bundle, device="cuda", precision="fp16")


def test_cupy_runner_imports_without_cupy_and_says_what_is_missing():
    from cytoedge.kernels.cuda_runner import CudaUnavailable
    from cytoedge.kernels.cupy_runner import CupyKernels, cupy_device_available

    ok, why = cupy_device_available()
    if ok:
        pytest.skip(f"CuPy and a GPU are present ({why}): benchmarks/gpu_check.sh checks the runner")
    assert why
    with pytest.raises(CudaUnavailable):
        CupyKernels()
    with pytest.raises(ValueError, match="compiler"):
        CupyKernels(compiler="clang")


def numpy_cupy_shim(lib) -> types.ModuleType:
    """A stand-in ``cupy`` module: numpy arrays as CuPy's, and ``RawModule`` kernels that launch the emulated
    library's entry point of the same name with CuPy's (grid, block, args) call, so ``CupyKernels``'s own
    argument lists and launch geometry are checked against the twin without a GPU."""

    class RawKernel:
        def __init__(self, name: str):
            self.fn = getattr(lib, f"emu_{name}")

        def __call__(self, grid, block, args):
            dims = [ctypes.c_uint(v) for v in (*grid, *(1,) * (3 - len(grid)), *block, *(1,) * (3 - len(block)))]
            cargs = []
            for a in args:
                if isinstance(a, np.ndarray):
                    assert a.flags.c_contiguous, "CuPy kernels read raw memory: arrays must be C-contiguous"
                    cargs.append(ctypes.c_void_p(a.ctypes.data))
                elif isinstance(a, np.int32):
                    cargs.append(ctypes.c_int(int(a)))
                elif isinstance(a, np.float32):
                    cargs.append(ctypes.c_float(float(a)))
                else:
                    raise TypeError(f"kernel argument {type(a).__name__}: pass numpy scalars of the kernel's types")
            self.fn(*dims, *cargs)

    class RawModule:
        def __init__(self, code: str, backend: str, options: tuple):
            assert backend in ("nvrtc", "nvcc") and any(o.startswith("-I") for o in options)
            self.code = code

        def get_function(self, name: str) -> RawKernel:
            assert f"{name}(" in self.code or f"ENTRY({name}," in self.code
            return RawKernel(name)

    shim = types.ModuleType("cupy")
    for name in ("asarray", "empty", "empty_like", "ascontiguousarray", "where", "full", "ones", "float32", "uint8",
                 "from_dlpack"):
        setattr(shim, name, getattr(np, name))
    shim.asnumpy = np.array
    shim.RawModule = RawModule
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"numpy shim"},
                                    CUDARuntimeError=RuntimeError)
    shim.cuda = types.SimpleNamespace(Device=lambda i: contextlib.nullcontext(), runtime=runtime)
    return shim


@pytest.fixture
def shim_kernels(device_kernels, monkeypatch):
    """``CupyKernels`` itself, its CuPy calls answered by ``numpy_cupy_shim``."""
    from cytoedge.kernels.cupy_runner import CupyKernels

    monkeypatch.setitem(sys.modules, "cupy", numpy_cupy_shim(device_kernels._lib))
    return CupyKernels()


def test_cupy_runner_launches_the_kernels_as_the_twin_computes(shim_kernels):
    """Its argument lists and grids, through gpu_check's own kernel comparison."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    result = gpu_check.check_kernels(shim_kernels, 40, np.random.default_rng(5))
    assert result["passed"], result
    assert all(row["max_abs_diff"] == 0 for row in result["prepare"])


def test_torch_cuda_loop_code_on_the_cpu_gives_the_host_errors(generated_batch, bundle, shim_kernels):
    """``TorchCudaLoop`` (DLPack in and out) with ``CupyKernels`` under the shim, PyTorch on the CPU in FP32:
    the GPU path's Python, run here, measures what the host loop measures."""
    pytest.importorskip("torch", reason="the PyTorch backend needs the torch extra")
    from cytoedge.runtime.backends.torch_backend import TorchBackend, TorchCudaLoop

    torch_cpu = TorchBackend(bundle, threads=1)
    loop = TorchCudaLoop(torch_cpu, shim_kernels)
    probes, _ = probes_from_calibration(bundle)
    noise = noise_bank(bundle)
    host = DenoiserErrorSource(generated_batch, bundle, torch_cpu, probes, noise)
    dev = DeviceErrorSource(generated_batch, bundle, loop, probes, noise)
    n, k = len(generated_batch), bundle.num_class_ids
    cells, classes = np.repeat(np.arange(n), k), np.tile(np.arange(k), n)
    np.testing.assert_allclose(dev(cells, classes, 0), host(cells, classes, 0), rtol=1e-5)
