"""Noise schedules: the ᾱ_t table a DDPM was trained with, as pure numpy.

Like a diffusers scheduler this holds numbers only (no model, no device, no file), so the
trainer, the estimators and the sampler all read the same table from the bundle's manifest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from cytoedge.runtime.errors import BundleError

SCHEDULE_KINDS = ("linear", "scaled_linear", "table")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0 … T-1 (t = 0 is the least noisy step)."""

    alphas_cumprod: np.ndarray

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a manifest ``noise_schedule`` block (kind + parameters, or an explicit table)."""
        kind = config.get("kind")
        if kind not in SCHEDULE_KINDS:
            raise BundleError(f"noise_schedule.kind is {kind!r}; expected one of {SCHEDULE_KINDS}")
        if kind == "table":
            table = np.asarray(config.get("alphas_cumprod", []), dtype=np.float64)
            if table.ndim != 1 or table.size < 2 or not np.all((table > 0) & (table < 1)):
                raise BundleError("noise_schedule.alphas_cumprod must be a list of values in (0, 1)")
            if np.any(np.diff(table) >= 0):
                raise BundleError("noise_schedule.alphas_cumprod must decrease strictly with t")
            return cls(table)
        try:
            steps = int(config["num_train_timesteps"])
            beta_start = float(config["beta_start"])
            beta_end = float(config["beta_end"])
        except KeyError as missing:
            raise BundleError(f"noise_schedule is missing field {missing}") from None
        if not 0 < beta_start < beta_end < 1 or steps < 2:
            raise BundleError(
                f"noise_schedule needs 0 < beta_start < beta_end < 1 and num_train_timesteps >= 2, "
                f"got beta_start={beta_start}, beta_end={beta_end}, num_train_timesteps={steps}"
            )
        if kind == "linear":
            betas = np.linspace(beta_start, beta_end, steps, dtype=np.float64)
        else:  # scaled_linear, as Stable Diffusion (and so CytoDiffusion) trains
            betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
        return cls(np.cumprod(1.0 - betas))

    def check_timesteps(self, t: np.ndarray) -> np.ndarray:
        """Return ``t`` as int64, refusing values outside the trained range."""
        t = np.asarray(t)
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got [{t.min()}, {t.max()}]"
            )
        return t.astype(np.int64)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Forward process q(x_t | x_0): x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε, per sample."""
        from cytoedge.kernels import add_noise

        return add_noise(x0, noise, self.alphas_cumprod[self.check_timesteps(t)].astype(np.float32))
