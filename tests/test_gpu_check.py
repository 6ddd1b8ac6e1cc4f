"""benchmarks/gpu_check.sh on the CPU: it parses, it says "nothing run" without a GPU (rc 0), and its dry run
(emulated kernels, emulated device backend) runs every step of the script's logic and passes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_TIMEOUT_S": "300"}
    run = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=360)
    return run, json.loads((out / "gpu_check.json").read_text())


def test_the_script_parses():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.access(SCRIPT, os.X_OK)


def test_without_a_gpu_nothing_runs_and_the_json_says_so(tmp_path):
    from cytoedge.kernels.cupy_runner import cupy_device_available

    if cupy_device_available()[0]:
        pytest.skip("a GPU with CuPy is present: the real check would run")
    run, doc = run_check(tmp_path)
    assert run.returncode == 0, run.stderr
    assert doc["status"] == "no CUDA device: nothing run" and doc["steps"] == {} and doc["reason"]
    assert "nothing run" in run.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="the dry run needs g++ for the emulated kernels")
def test_cpu_dry_run_runs_every_step_through_the_device_loop(tmp_path):
    run, doc = run_check(tmp_path, "--cpu-dry-run", "--cells", "8")
    assert run.returncode == 0, run.stdout + run.stderr
    steps = doc["steps"]
    assert doc["status"] == "passed" and doc["environment"]["mode"] == "cpu-dry-run" and "no GPU ran" in doc["note"]
    assert set(steps) == {"kernels", "cells", "device_loop", "host_loop", "reference", "agreement"}
    assert all(s.get("passed", True) for s in steps.values()), steps
    assert steps["cells"]["error_source"] == "DeviceErrorSource" and steps["cells"]["cells"] == 8
    loop = steps["device_loop"]
    assert loop["device_to_host_floats"] == round(loop["nfe_mean"] * loop["cells"])  # the errors, nothing else
    assert steps["agreement"]["device_vs_host_loop"] == 1.0


def test_a_device_without_the_whole_stack_runs_nothing_and_says_what_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.util

    import cytoedge.kernels.cupy_runner as cupy_runner

    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(cupy_runner, "cupy_device_available", lambda device=0: (True, "a GPU seen by CuPy"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 3
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["status"] == gpu_check.INCOMPLETE and "PyTorch CUDA: False" in doc["reason"]
