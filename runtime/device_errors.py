"""The estimator's probe loop on the backend's device: only one float per (cell, class) comes back.

``DeviceErrorSource`` measures what ``estimator.DenoiserErrorSource`` measures, with the arrays kept
where the backend's ``DeviceLoop`` lives: the tiles go up once, each probe view is cut there once by
the CUDA kernels (pixels beyond a tile filled with glass, as ``cells.model_inputs`` does), the noise
bank stays there, and noising, the denoiser and the masked error run there. Per call, the host sends
the cell rows, timesteps and class ids (integers) and receives the ``n`` errors.

Pixel bundles only: a latent bundle's encoder runs on ONNX Runtime on the host, so
``estimator.error_source_for`` gives a latent bundle the host loop (and says so in the log).
"""
from __future__ import annotations

import numpy as np

from cytoedge.kernels.cpu_twin import error_norm
from cytoedge.runtime.backends import DeviceLoop
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.calibration_config import Probe
from cytoedge.runtime.cells import CellBatch, glass_values
from cytoedge.runtime.errors import BackendError


class DeviceErrorSource:
    """``(cell_idx [n], class_idx [n], k) -> float64 [n]``, as ``DenoiserErrorSource``, computed on a device."""

    def __init__(self, batch: CellBatch, bundle: ModelBundle, loop: DeviceLoop, probes: list[Probe],
                 noise: np.ndarray):
        if bundle.is_latent:
            raise BackendError(f"{bundle.path} is a latent bundle: its encoder runs on the host; use the host loop")
        self.bundle, self.loop, self.probes = bundle, loop, probes
        kernels = loop.kernels
        xp = kernels.xp
        channels, size = bundle.denoiser_shape
        colour = bundle.colour_transform()
        glass = kernels.to_device(glass_values(colour)[None, :, None, None])
        views = sorted({(p.angle, p.flip) for p in probes})
        self.view_index = {v: i for i, v in enumerate(views)}
        self.x0 = []
        for angle, flip in views:
            x, valid = kernels.prepare_batch_device(batch.tiles, batch.rows_in_view(angle, flip), bundle.input_size,
                                                    colour)
            self.x0.append(xp.where(valid[:, None] > 0, x, glass))
        self.noise = kernels.to_device(np.ascontiguousarray(noise, np.float32))
        mask, self.inv_norm = error_norm(bundle.loss_mask(), (1, channels, size, size))
        self.mask = kernels.to_device(mask)
        self.abar = bundle.schedule.alphas_cumprod

    def __call__(self, cell_idx: np.ndarray, class_idx: np.ndarray, k: int) -> np.ndarray:
        p = self.probes[k]
        kernels = self.loop.kernels
        xp = kernels.xp
        uniq, inverse = np.unique(cell_idx, return_inverse=True)
        x0 = self.x0[self.view_index[(p.angle, p.flip)]][kernels.to_device(uniq)]
        noise = self.noise[p.noise_index:p.noise_index + 1]
        abar = xp.full(uniq.size, self.abar[p.timestep], xp.float32)
        x_t = kernels.add_noise_device(x0, noise, abar)[kernels.to_device(inverse.reshape(-1))]
        eps = self.loop.predict_noise_device(x_t, np.full(cell_idx.size, p.timestep), class_idx)
        err = kernels.masked_weighted_error_device(eps, noise, self.mask, xp.ones(cell_idx.size, xp.float32),
                                                   self.inv_norm)
        return kernels.to_host(err).astype(np.float64)
