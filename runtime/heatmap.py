"""Counterfactual heatmaps: where the predicted class explains a cell's pixels better than the runner-up.

For each timestep t of the estimator (with its noise ε_t from the seeded bank) the cell is noised,
``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε_t``, and both conditional denoisers predict the noise. The map is the
per-pixel difference of squared errors, runner-up minus predicted, averaged over channels and
timesteps: positive where the predicted class fits better, i.e. the pixels that argue for it.

Timesteps and noise are the fast estimator's (``bundle.calibration["timesteps"]``, or its probes'
timesteps and noise indices, drawn from its noise bank; the probes' rotations/flips are not
applied, so the map lies on the cell as shown). A bundle without calibration uses
:data:`FALLBACK_TIMESTEP_FRACTIONS` of its schedule and a noise bank seeded with
:data:`FALLBACK_NOISE_SEED`; each record says which plan made its map.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoedge.kernels import ColourTransform, prepare_batch
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch

# Spread over the range where class evidence lives (low t: texture; mid t: shape), 1000-step schedules.
FALLBACK_TIMESTEP_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7)
FALLBACK_NOISE_SEED = 0


@dataclass(frozen=True)
class HeatmapPlan:
    timesteps: np.ndarray  # [T] int64
    noise: np.ndarray  # [T, 3, S, S] float32
    source: str  # "calibration" or "fallback"


def heatmap_plan(bundle: ModelBundle) -> HeatmapPlan:
    """Timesteps and noise the maps use: the calibrated ones, else the documented fallback."""
    cal = bundle.calibration or {}
    size = bundle.input_size
    if cal.get("timesteps") or cal.get("probes"):
        from cytoedge.runtime.estimator import noise_bank

        bank = noise_bank(bundle)
        if cal.get("timesteps"):
            ts = np.asarray(cal["timesteps"], np.int64)
            noise_index = np.arange(len(ts)) % len(bank)
        else:  # the fast estimator's probes: (timestep, noise_index, view)
            ts = np.asarray([p["timestep"] for p in cal["probes"]], np.int64)
            noise_index = np.asarray([p["noise_index"] for p in cal["probes"]], np.int64) % len(bank)
        return HeatmapPlan(ts, bank[noise_index], "calibration")
    n = bundle.schedule.num_train_timesteps
    ts = np.array([round(f * (n - 1)) for f in FALLBACK_TIMESTEP_FRACTIONS], np.int64)
    noise = np.random.default_rng(FALLBACK_NOISE_SEED).standard_normal((len(ts), 3, size, size), dtype=np.float32)
    return HeatmapPlan(ts, noise, "fallback")


def counterfactual_heatmaps(batch: CellBatch, predicted: np.ndarray, runner_up: np.ndarray, bundle: ModelBundle,
                            backend: DenoiserBackend, plan: HeatmapPlan,
                            colour: ColourTransform | None = None) -> np.ndarray:
    """``[N, S, S] float32`` maps (runner-up error − predicted error) for the cells of ``batch``."""
    size = bundle.input_size
    norm = bundle.manifest["input"]["normalisation"]
    colour = colour or ColourTransform(mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    x0, _ = prepare_batch(batch.tiles, batch.cells, size, colour)
    n, t_count = len(batch), len(plan.timesteps)
    # Rows: cell i, timestep j, class (predicted, runner-up) → index (i * T + j) * 2 + c.
    cell_idx = np.repeat(np.arange(n), t_count * 2)
    t_idx = np.tile(np.repeat(np.arange(t_count), 2), n)
    classes = np.stack([predicted, runner_up], axis=1).astype(np.int64)
    class_ids = classes[cell_idx, np.tile([0, 1], n * t_count)]
    noise = plan.noise[t_idx]
    timesteps = plan.timesteps[t_idx]
    x_t = bundle.schedule.add_noise(x0[cell_idx], noise, timesteps)
    eps = np.empty_like(x_t)
    step = max(1, int(backend.max_batch))
    for s in range(0, len(x_t), step):
        eps[s:s + step] = backend.predict_noise(x_t[s:s + step], timesteps[s:s + step], class_ids[s:s + step])
    sq = ((eps - noise) ** 2).mean(axis=1).reshape(n, t_count, 2, size, size)
    return (sq[:, :, 1] - sq[:, :, 0]).mean(axis=1).astype(np.float32)
