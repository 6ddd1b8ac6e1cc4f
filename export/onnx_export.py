"""PyTorch denoiser → ONNX with the bundle's contract: dynamic batch, per-sample timestep and class.

``export_network`` exports any module against its :mod:`cytoedge.runtime.backends.engine_spec` spec;
``DenoiserError`` wraps a denoiser into the fused graph (x0, noise, t, class, weight) → masked
per-sample error, so an engine returns ``[B]`` scalars instead of ``[B,3,H,W]`` noise predictions.
"""
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


def export_network(module, spec, example_inputs: tuple, path: Path, opset: int = OPSET,
                   constant_folding: bool = False) -> Path:
    """Export ``module(*example_inputs)`` to ONNX with the spec's names and dynamic batch axes.

    The legacy (TorchScript) exporter is used: it writes valid graphs at opset 17 and 18, where the
    dynamo exporter wrote an invalid opset-17 file here.
    """
    import torch

    if opset < 17:
        raise ValueError(f"opset {opset} is below 17 (GroupNorm/attention export needs >= 17)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices
        torch.onnx.export(module.eval(), example_inputs, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, do_constant_folding=constant_folding, dynamo=False)
    return path


def _denoiser_error_module():
    import torch
    from torch import nn

    class DenoiserError(nn.Module):
        """Forward noising, ε prediction and the masked, weighted squared error of one probe per sample.

        Computes what the estimators compute on the host (``schedule.add_noise`` then
        ``kernels.masked_weighted_error``), inside the graph.
        """

        def __init__(self, denoiser: nn.Module, alphas_cumprod: np.ndarray, mask: np.ndarray):
            super().__init__()
            self.denoiser = denoiser
            a = torch.as_tensor(np.asarray(alphas_cumprod, np.float64))
            self.register_buffer("sqrt_alpha", a.sqrt().float())
            self.register_buffer("sqrt_one_minus_alpha", (1 - a).sqrt().float())
            self.register_buffer("mask", torch.as_tensor(np.asarray(mask, np.float32))[None, None])

        def forward(self, x0, noise, timestep, class_id, weight):
            a = self.sqrt_alpha[timestep][:, None, None, None]
            b = self.sqrt_one_minus_alpha[timestep][:, None, None, None]
            eps = self.denoiser(a * x0 + b * noise, timestep, class_id)
            sq = (eps - noise) ** 2 * self.mask
            return sq.sum(dim=(1, 2, 3)) / (self.mask.sum() * eps.shape[1]) * weight

    return DenoiserError


def denoiser_error_module(denoiser, alphas_cumprod: np.ndarray, mask: np.ndarray):
    """The fused (x0, noise, timestep, class_id, weight) → error[B] module around ``denoiser``."""
    return _denoiser_error_module()(denoiser, alphas_cumprod, mask).eval()


def export_fused_error_onnx(denoiser, path: Path, image_size: int, alphas_cumprod: np.ndarray, mask: np.ndarray,
                            channels: int = 3, opset: int = OPSET) -> Path:
    """Export the fused error graph; its spec is ``engine_spec.fused_error_spec``."""
    import torch

    from cytoedge.runtime.backends.engine_spec import fused_error_spec

    spec = fused_error_spec(image_size, channels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, image_size, image_size, generator=g)
    example = (x, torch.randn(x.shape, generator=g), torch.tensor([10, 500]), torch.tensor([0, 1]),
               torch.ones(2))
    return export_network(denoiser_error_module(denoiser, alphas_cumprod, mask), spec, example, path, opset)


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
