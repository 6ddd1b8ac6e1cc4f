"""The space a cell is scored in: model pixels, or a latent-diffusion bundle's VAE latents.

Pixel bundles (cytoedge's own) denoise the preprocessed crop itself. Latent bundles (CytoDiffusion,
Stable Diffusion's VAE) denoise the scaled latent mean of the crop: the bundle's ``vae_encoder``
network maps ``[N,3,S,S]`` in the model's value range to ``[N,C,s,s]`` once per cell view, before
any noise is added. The estimators call ``encode`` and never ask which space they are in.
"""
from __future__ import annotations

import numpy as np

import logging

from cytoedge.runtime.backends import DenoiserBackend, backend_device
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)


class PixelSpace:
    """Identity: the denoiser works on model-scale pixels."""

    name = "pixels"

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x


class VaeLatentSpace:
    """The bundle's ``vae_encoder`` ONNX graph on ONNX Runtime (CPU unless CUDA is asked for)."""

    name = "vae-latent"

    def __init__(self, bundle: ModelBundle, threads: int | None = None, providers: list[str] | None = None,
                 max_batch: int = 16):
        import onnxruntime as ort

        from cytoedge.runtime.backends.onnxruntime_backend import session_options

        path = bundle.network_path(bundle.encoder_network)
        if path is None:
            raise BackendError(f"{bundle.path}: manifest 'latent' names no encoder network among 'networks'")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads),
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own untyped errors for unreadable graphs
            raise BackendError(f"ONNX Runtime could not load {path}: {e}") from e
        self.input_name = self.session.get_inputs()[0].name
        self.shape = bundle.denoiser_shape
        self.max_batch = max_batch

    def encode(self, x: np.ndarray) -> np.ndarray:
        parts = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[s:s + self.max_batch], np.float32)})[0]
                 for s in range(0, x.shape[0], self.max_batch)]
        channels, size = self.shape
        z = np.concatenate(parts) if parts else np.zeros((0, channels, size, size), np.float32)
        if z.shape[1:] != (channels, size, size) or not np.all(np.isfinite(z)):
            raise BackendError(f"the VAE encoder returned {z.shape} (non-finite values: {not np.all(np.isfinite(z))}); "
                               f"the manifest's latent is {self.shape}")
        return z


_ENCODERS: dict[tuple[str, str, tuple[str, ...]], VaeLatentSpace] = {}


def encoder_providers(backend: DenoiserBackend | None) -> list[str]:
    """ONNX Runtime providers for the encoder: on the backend's GPU where the denoiser runs on one and this
    ONNX Runtime offers CUDA (onnxruntime-gpu), else the CPU (said once in the log)."""
    if backend is None or backend_device(backend) != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    log.info("%s runs on a GPU but this ONNX Runtime has no CUDA provider: the VAE encoder runs on the CPU",
             backend.name)
    return ["CPUExecutionProvider"]


def create_encoder(bundle: ModelBundle, backend: DenoiserBackend | None = None) -> PixelSpace | VaeLatentSpace:
    """The encoder of ``bundle``'s scoring space, on ``backend``'s device (``encoder_providers``); a latent
    bundle's ONNX session is opened once per process, bundle version and device (the estimators ask for
    it on every batch)."""
    if not bundle.is_latent:
        return PixelSpace()
    providers = tuple(encoder_providers(backend))
    key = (str(bundle.path.resolve()), bundle.sha256, providers)
    if key not in _ENCODERS:
        _ENCODERS[key] = VaeLatentSpace(bundle, providers=list(providers))
    return _ENCODERS[key]
