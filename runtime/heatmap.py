"""Counterfactual heatmaps: where the predicted class explains a cell's pixels better than the runner-up.

For each calibrated probe (timestep t, noise ε from the seeded bank, view = rotation/flip) the cell
is cut in the probe's view and noised, ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε``, and both conditional
denoisers predict the noise. The probe's map is the per-pixel difference of squared errors,
runner-up minus predicted, averaged over channels: positive where the predicted class fits better,
i.e. the pixels that argue for it. Each map is turned back from its view onto the cell as shown,
the maps are averaged with the calibration's probe weights (the weights the classifier itself
gives them), and the mean is smoothed with a Gaussian of :data:`SMOOTH_UM`: one probe's map is
dominated by the noise draw (speckle a reader cannot interpret); the evidence lies in structures
of a micrometre or more (nuclear lobes, granules, chromatin).

A bundle without calibration uses :data:`FALLBACK_TIMESTEP_FRACTIONS` of its schedule, one view,
equal weights and a noise bank seeded with :data:`FALLBACK_NOISE_SEED`; each record says which plan
made its map. Drawing the map only inside the cell is the report's job (runtime/cell_views.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cytoedge.kernels import ColourTransform
from cytoedge.kernels.cell_batch import sampling_matrix
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch

# Spread over the range where class evidence lives (low t: texture; mid t: shape), 1000-step schedules.
FALLBACK_TIMESTEP_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7)
FALLBACK_NOISE_SEED = 0
# Gaussian sigma of the smoothing, in µm: a granule or a nuclear lobe is ≥ 1 µm; finer detail in one
# map is the noise draw's, not the cell's.
SMOOTH_UM = 1.0


@dataclass(frozen=True)
class HeatmapPlan:
    timesteps: np.ndarray  # [P] int64
    noise: np.ndarray  # [P, 3, S, S] float32
    views: np.ndarray  # [P, 2] float64: (angle, flip) of each probe
    weights: np.ndarray  # [P] float64, summing to 1
    source: str  # "calibration" or "fallback"


def heatmap_plan(bundle: ModelBundle) -> HeatmapPlan:
    """Probes the maps use: the calibrated ones with their weights, else the documented fallback."""
    cal = bundle.calibration
    size = bundle.input_size
    if cal is not None:
        from cytoedge.runtime.estimator import noise_bank

        bank = noise_bank(bundle)
        ts = np.asarray([p.timestep for p in cal.probes], np.int64)
        noise_index = np.asarray([p.noise_index for p in cal.probes], np.int64)
        views = np.asarray([(p.angle, float(p.flip)) for p in cal.probes], np.float64)
        return HeatmapPlan(ts, bank[noise_index], views, cal.probe_weights / cal.probe_weights.sum(), "calibration")
    n = bundle.schedule.num_train_timesteps
    ts = np.array([round(f * (n - 1)) for f in FALLBACK_TIMESTEP_FRACTIONS], np.int64)
    noise = np.random.default_rng(FALLBACK_NOISE_SEED).standard_normal((len(ts), 3, size, size), dtype=np.float32)
    return HeatmapPlan(ts, noise, np.zeros((len(ts), 2)), np.full(len(ts), 1.0 / len(ts)), "fallback")


def unview(maps: np.ndarray, angle: float, flip: bool) -> np.ndarray:
    """Maps ``[N, S, S]`` cut in a probe's view, put back on the cell as shown (the unrotated cut)."""
    if angle == 0.0 and not flip:
        return maps
    size = maps.shape[-1]
    c = (size - 1) / 2.0
    # The view's sampling affine maps a view pixel to its place in the unrotated cut: warping with it
    # forward (not inverse) moves each value there.
    m = sampling_matrix(np.array([0.0, c, c, angle, float(flip), 1.0]), size).astype(np.float32)
    return np.stack([cv2.warpAffine(a, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                     for a in maps])


def counterfactual_heatmaps(batch: CellBatch, predicted: np.ndarray, runner_up: np.ndarray, bundle: ModelBundle,
                            backend: DenoiserBackend, plan: HeatmapPlan,
                            colour: ColourTransform | None = None) -> np.ndarray:
    """``[N, S, S] float32`` maps (runner-up error − predicted error, weighted over the plan's probes,
    smoothed) for the cells of ``batch``, on the unrotated cut of each cell."""
    size = bundle.input_size
    colour = colour or bundle.colour_transform()
    n = len(batch)
    classes = np.concatenate([predicted, runner_up]).astype(np.int64)
    total = np.zeros((n, size, size), np.float32)
    step = max(1, int(backend.max_batch))
    x0_of_view: dict[tuple[float, float], np.ndarray] = {}
    for k, (t, noise, (angle, flip), w) in enumerate(zip(plan.timesteps, plan.noise, plan.views, plan.weights)):
        view = (float(angle), float(flip))
        if view not in x0_of_view:
            x0_of_view[view] = batch.inputs(view[0], bool(view[1]), bundle, colour)
        x0 = np.concatenate([x0_of_view[view]] * 2)  # rows: every cell under its prediction, then its runner-up
        ts = np.full(len(x0), t, np.int64)
        x_t = bundle.schedule.add_noise(x0, np.broadcast_to(noise, x0.shape), ts)
        eps = np.empty_like(x_t)
        for s in range(0, len(x_t), step):
            eps[s:s + step] = backend.predict_noise(x_t[s:s + step], ts[s:s + step], classes[s:s + step])
        sq = ((eps - noise[None]) ** 2).mean(axis=1)
        total += np.float32(w) * unview(sq[n:] - sq[:n], view[0], bool(view[1]))
    sigma = SMOOTH_UM / bundle.um_per_px
    return np.stack([cv2.GaussianBlur(m, (0, 0), sigma) for m in total]).astype(np.float32) if n else total
