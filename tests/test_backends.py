"""Denoiser backends: the ONNX graph computes what the PyTorch network computes; bad batches refused."""
from __future__ import annotations

import numpy as np
import pytest

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.backends.checks import check_output
from cytoedge.runtime.errors import BackendError


def random_batch(rng, bundle, n):
    s = bundle.input_size
    return (rng.standard_normal((n, 3, s, s)).astype(np.float32), rng.integers(0, 1000, n),
            rng.integers(0, len(bundle.class_names), n))


def test_ort_backend_satisfies_the_protocol(ort_backend):
    assert isinstance(ort_backend, DenoiserBackend)
    assert ort_backend.name == "onnxruntime-cpu"


def test_onnx_matches_pytorch_on_the_bundled_model(bundle, ort_backend, rng):
    pytest.importorskip("torch", reason="the PyTorch reference needs the torch extra")
    from cytoedge.runtime.backends.torch_backend import TorchBackend

    x, t, c = random_batch(rng, bundle, 6)
    got = ort_backend.predict_noise(x, t, c)
    want = TorchBackend(bundle, threads=1).predict_noise(x, t, c)
    assert got.shape == want.shape == x.shape
    assert np.abs(got - want).max() < 1e-4


def test_prediction_depends_on_class_and_timestep(bundle, ort_backend, rng):
    x, _, _ = random_batch(rng, bundle, 2)
    x = np.repeat(x[:1], 2, 0)
    by_class = ort_backend.predict_noise(x, np.array([300, 300]), np.array([0, 7]))
    by_time = ort_backend.predict_noise(x, np.array([50, 900]), np.array([3, 3]))
    assert np.abs(by_class[0] - by_class[1]).mean() > 1e-4
    assert np.abs(by_time[0] - by_time[1]).mean() > 1e-3
    null = ort_backend.predict_noise(x[:1], np.array([300]), np.array([ort_backend.bundle.null_class_id]))
    assert ort_backend.bundle.null_class_id == 8 and np.abs(null[0] - by_class[0]).mean() > 1e-4


@pytest.mark.parametrize("shape, t, c, message", [
    ((0, 3, 32, 32), [], [], "empty batch"),
    ((2, 3, 16, 16), [1, 2], [0, 1], "expected"),
    ((2, 3, 32, 32), [1], [0, 1], "must both be"),
    ((2, 3, 32, 32), [1, 1000], [0, 1], "timestep values"),
    ((2, 3, 32, 32), [1, 2], [0, 9], "class_id values"),  # 8 is the bundled model's null class
])
def test_bad_batches_are_refused(ort_backend, bundle, shape, t, c, message):
    shape = shape[:2] + (bundle.input_size, bundle.input_size) if shape[2] == 32 else shape
    with pytest.raises(BackendError, match=message):
        ort_backend.predict_noise(np.zeros(shape, np.float32), np.array(t, np.int64), np.array(c, np.int64))


def test_non_finite_output_is_reported():
    eps = np.zeros((3, 3, 4, 4), np.float32)
    eps[1, 0, 0, 0] = np.nan
    with pytest.raises(BackendError, match="NaN/Inf for 1 of 3 samples"):
        check_output(eps, "test-backend")


@pytest.mark.parametrize("batch, streams, want", [
    (64, 2, [(0, 32), (32, 64)]),
    (21, 2, [(0, 10), (10, 21)]),
    (15, 2, [(0, 15)]),  # two streams would get fewer than MIN_SAMPLES_PER_STREAM each
    (64, 3, [(0, 21), (21, 43), (43, 64)]),
    (5, 4, [(0, 5)]),
])
def test_batches_are_split_into_contiguous_stream_shards(batch, streams, want):
    from cytoedge.runtime.backends.onnxruntime_backend import shard_bounds

    assert shard_bounds(batch, streams) == want


@pytest.mark.parametrize("threads, streams, want", [(2, None, (2, 1)), (12, None, (6, 2)), (7, None, (7, 1)),
                                                     (16, None, (8, 2)), (4, 1, (1, 4)), (4, 3, (3, 1))])
def test_stream_plan_shares_the_cores(threads, streams, want):
    from cytoedge.runtime.backends.onnxruntime_backend import stream_plan

    assert stream_plan(threads, streams) == want


@pytest.mark.parametrize("threads, streams", [(2, 3), (0, None), (2, -1)])
def test_impossible_stream_plans_are_refused(threads, streams):
    from cytoedge.runtime.backends.onnxruntime_backend import stream_plan

    with pytest.raises(BackendError, match="threads|streams"):
        stream_plan(threads, streams)


def test_streams_change_no_output_bit(bundle, rng):
    """Sharding a batch across sessions must not change a single value: the estimator promises
    bit-identical results whatever the backend's batching."""
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    x, t, c = random_batch(rng, bundle, 37)
    one = OnnxRuntimeBackend(bundle, threads=2, streams=1)
    two = OnnxRuntimeBackend(bundle, threads=2, streams=2, max_batch=20)  # chunks of 20 and 17, each in 2 shards
    assert one.streams == 1 and two.streams == 2
    np.testing.assert_array_equal(one.predict_noise(x, t, c), two.predict_noise(x, t, c))
    two.close()


def test_default_stream_plan_follows_the_cores_this_process_may_use(monkeypatch):
    """A container pinned to 2 of a host's 64 cores must not start 8 streams."""
    import os

    from cytoedge.runtime.backends import onnxruntime_backend as ob

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert ob.usable_cores() == 2
    assert ob.stream_plan(None, None) == (2, 1)


def test_a_latent_bundles_encoder_follows_the_backends_device(monkeypatch, caplog):
    """The VAE encoder runs where the denoiser does: on the GPU with a GPU backend when this ONNX Runtime
    offers CUDA, else on the CPU, and the log says why."""
    import onnxruntime as ort

    from cytoedge.runtime.encoders import encoder_providers

    class Backend:
        name, max_batch = "fake", 8

        def __init__(self, device_kind=None):
            if device_kind:
                self.device_kind = device_kind

    assert encoder_providers(None) == encoder_providers(Backend()) == ["CPUExecutionProvider"]
    assert encoder_providers(Backend("cpu")) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("INFO", logger="cytoedge.runtime.encoders"):
        assert encoder_providers(Backend("cuda")) == ["CPUExecutionProvider"]
    assert "no CUDA provider" in caplog.text
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert encoder_providers(Backend("cuda")) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
