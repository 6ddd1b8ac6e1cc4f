"""Backend selection (auto = TensorRT > ONNX Runtime CUDA > CPU) and `cytoedge doctor`."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json

import pytest

from cytoedge.runtime.backends import select
from cytoedge.runtime.cli import main
from cytoedge.runtime.errors import BackendError

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed: the 'not installed' path cannot be checked here")
def test_tensorrt_request_without_tensorrt_says_why(bundle):
    with pytest.raises(BackendError, match="tensorrt is not installed"):
        select.create_backend(bundle, "tensorrt")


def test_auto_falls_back_with_logged_reasons(bundle, caplog):
    caplog.set_level("INFO", logger=select.__name__)
    backend = select.create_backend(bundle, "auto", threads=1)
    rows = {r.name: r for r in select.backend_availability(bundle)}
    first = next(name for name, r in rows.items() if r.available)
    assert backend.name == first
    for name, r in rows.items():
        if name == first:
            break
        assert r.reason in caplog.text
    backend.close()


def test_unknown_backend_is_refused(bundle):
    with pytest.raises(BackendError, match="unknown backend"):
        select.create_backend(bundle, "tensorflow")


def test_both_onnxruntime_packages_installed_is_detected(monkeypatch):
    versions = {"onnxruntime": "1.20.0", "onnxruntime-gpu": "1.20.0"}

    def fake_version(dist):
        if dist in versions:
            return versions[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    msg = select.onnxruntime_conflict()
    assert "onnxruntime-gpu 1.20.0" in msg and "pip uninstall -y onnxruntime onnxruntime-gpu" in msg
    del versions["onnxruntime-gpu"]
    assert select.onnxruntime_conflict() is None


def test_doctor_lists_every_backend(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in report["backends"]]
    assert names == ["tensorrt", "onnxruntime-cuda", "onnxruntime-cpu", "onnxruntime-cpu-int8", "torch", "torch-cuda"]
    assert all(b["reason"] for b in report["backends"])
    assert report["auto"] in names


def test_bench_writes_latency_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--backends", "onnxruntime-cpu", "--batches", "1,2", "--repeats", "3", "--warmup", "1",
                 "--threads", "1", "--cells", "2", "--trials", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["denoiser"]] == [1, 2]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in result["denoiser"])
    assert result["estimator_runs"][0]["cells"] == 2 and result["estimator_runs"][0]["cells_per_s"] > 0
    assert "p50 ms" in capsys.readouterr().out
