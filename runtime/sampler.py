"""DDIM sampling from the bundled class-conditional denoiser (Song et al. 2021).

η = 1 (ancestral, DDPM-like) is the default: on the small bundled model it gives cleaner cells than
deterministic DDIM (η = 0), which leaves grainy textures; measured on 48 cells, 50 steps, the fast
estimator recognised the drawn class in 0.79 of η = 1 samples against 0.48 of η = 0 samples.

Classifier-free guidance (Ho & Salimans 2022) where the network was trained with a null class:
ε = ε_null + w·(ε_class − ε_null), both predictions from one batch. The bundle's manifest gives the
scale (``sampling.guidance_scale``, with how it was chosen); w = 1 is plain conditional sampling.

Used to draw synthetic cells for the demo smear and the test fixtures: nothing real is shipped.
"""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BundleError


def guidance_scale(bundle: ModelBundle, guidance: float | None = None) -> float:
    """The guidance scale to draw with: ``guidance``, else the bundle's; refused unless finite, >= 1,
    and (above 1) backed by a null class."""
    scale = bundle.guidance_scale if guidance is None else float(guidance)
    if not (np.isfinite(scale) and scale >= 1.0):
        raise ValueError(f"guidance must be a finite number >= 1 (1 = no guidance), got {scale}")
    if scale != 1.0 and bundle.null_class_id is None:
        raise BundleError(f"{bundle.path}: guidance {scale} needs a null class, and this network has none; "
                          "use guidance 1")
    return scale


def guided_noise(backend: DenoiserBackend, x: np.ndarray, t: int, class_ids: np.ndarray, null_id: int | None,
                 guidance: float) -> np.ndarray:
    """ε̂ for one sampling step: conditional, or guided by the null class in the same batch."""
    n = len(class_ids)
    if guidance == 1.0:
        return backend.predict_noise(x, np.full(n, t), class_ids)
    eps = backend.predict_noise(np.concatenate([x, x]), np.full(2 * n, t),
                                np.concatenate([class_ids, np.full(n, null_id, np.int64)]))
    return eps[n:] + guidance * (eps[:n] - eps[n:])


def ddim_sample(bundle: ModelBundle, backend: DenoiserBackend, class_ids: np.ndarray, steps: int = 50,
                seed: int = 0, eta: float = 1.0, guidance: float | None = None) -> np.ndarray:
    """Sample one cell per entry of ``class_ids``; returns RGB uint8 ``[N, S, S, 3]`` at model scale.
    ``guidance`` overrides the bundle's classifier-free guidance scale."""
    class_ids = np.asarray(class_ids, np.int64).reshape(-1)
    if bundle.is_latent:
        raise BundleError(f"{bundle.path} is a latent-diffusion bundle without a VAE decoder: it can score cells "
                          "but not draw them")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    guidance = guidance_scale(bundle, guidance)
    rng = np.random.default_rng(seed)
    a_bar = bundle.schedule.alphas_cumprod
    size = bundle.input_size
    ts = np.linspace(bundle.schedule.num_train_timesteps - 1, 0, steps).round().astype(np.int64)
    x = rng.standard_normal((len(class_ids), 3, size, size)).astype(np.float32)
    for i, t in enumerate(ts):
        eps = guided_noise(backend, x, int(t), class_ids, bundle.null_class_id, guidance)
        a_t = a_bar[t]
        a_prev = a_bar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        # (12) of Song et al.: predicted x0, then the direction pointing to x_t, then optional noise.
        x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -1.0, 1.0)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        direction = np.sqrt(np.maximum(1 - a_prev - sigma**2, 0.0)) * eps
        x = (np.sqrt(a_prev) * x0 + direction).astype(np.float32)
        if sigma > 0:
            x += (sigma * rng.standard_normal(x.shape)).astype(np.float32)
    colour = bundle.colour_transform()  # the inverse of the normalisation every cut goes through
    rgb01 = x.transpose(0, 2, 3, 1) * np.asarray(colour.std, np.float32) + np.asarray(colour.mean, np.float32)
    return np.clip(rgb01 * 255.0 + 0.5, 0, 255).astype(np.uint8)
