"""PyTorch denoiser → ONNX with the bundle's contract: dynamic batch, per-sample timestep and class."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DENOISER_INPUTS = ("x_t", "timestep", "class_id")
DENOISER_OUTPUTS = ("eps",)
OPSET = 17


def export_denoiser_onnx(model, path: Path, image_size: int, channels: int = 3, opset: int = OPSET) -> Path:
    """Trace ``model(x_t, timestep, class_id)`` to ONNX.

    Constant folding stays off so that the graph's initialisers keep the PyTorch parameter names:
    the PyTorch reference backend rebuilds the network from them.
    """
    import torch

    model = model.eval()
    x = torch.randn(2, channels, image_size, image_size)
    t = torch.tensor([10, 500], dtype=torch.int64)
    c = torch.tensor([0, 1], dtype=torch.int64)
    batch = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        torch.onnx.export(model, (x, t, c), str(path), input_names=list(DENOISER_INPUTS),
                          output_names=list(DENOISER_OUTPUTS),
                          dynamic_axes={n: batch for n in DENOISER_INPUTS + DENOISER_OUTPUTS},
                          opset_version=opset, do_constant_folding=False, dynamo=False)
    return path


def max_abs_error_vs_torch(model, onnx_path: Path, image_size: int, batch: int = 8, seed: int = 0) -> float:
    """Largest |ONNX Runtime − PyTorch| over a random batch: the export's validation figure."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int64)
    c = rng.integers(0, model.config.num_classes, batch).astype(np.int64)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x_t": x, "timestep": t, "class_id": c})[0]
    with torch.inference_mode():
        want = model.eval()(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()
    return float(np.abs(got - want).max())
