"""The fast likelihood estimator: a fixed, calibrated set of denoising probes with sequential elimination.

A *probe* is (timestep, noise from a seeded bank, view = rotation/flip). Every cell meets the same
probes in the same order, so a cell's result is reproducible bit for bit. For each probe the
masked denoising error of every class still in the race is measured (one noise shared by all
classes), weighted, and added to the class's running score ``S_c``. After probe k a class whose
gap to the leader exceeds the calibrated margin ``m_k`` is dropped; the race ends when one class
is left or the probes run out. Gaps are extrapolated to the full probe set,
``ĝ_c = (S_c − S_lead) · W_M / W_k`` (``W`` = cumulative probe weight at the class's last probe),
and ``softmax(−ĝ / T)`` gives the class probabilities. A site-adapted calibration (``cytoedge adapt``)
adds a per-class, per-probe offset to each class's error before weighting: on a new scanner or stain
a class's denoiser can be systematically better or worse than the others, whatever the cell.

Where the network has a null class (trained unconditionally on a share of samples), every probe a
cell runs also measures the null class's error: the anomaly score compares the best class with it
(runtime/decisions.py), one extra denoiser call per probe.

All the numbers (probes, weights, margins, temperature) come from the bundle's calibration.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cytoedge.kernels import add_noise, masked_weighted_error
from cytoedge.runtime.backends import DenoiserBackend, device_loop_of
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.calibration_config import Probe
from cytoedge.runtime.cells import CellBatch
from cytoedge.runtime.device_errors import DeviceErrorSource
from cytoedge.runtime.encoders import create_encoder
from cytoedge.runtime.errors import BackendError, CalibrationError

log = logging.getLogger(__name__)

# errors(cell_index [n], class_id [n], probe k) -> masked error [n]
ErrorSource = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class RaceSettings:
    """What the sequential race needs: probe weights, elimination margins (one per probe), and optionally
    class offsets ``[K, M]`` (added to class c's error at probe k; none = zeros). The temperature is not
    the race's: it turns the race's gaps into probabilities afterwards (runtime/decisions.cell_temperatures)."""

    weights: np.ndarray
    margins: np.ndarray
    class_offsets: np.ndarray | None = None

    def __post_init__(self):
        if self.weights.ndim != 1 or self.weights.size == 0 or np.any(self.weights <= 0):
            raise CalibrationError("probe weights must be a non-empty list of positive numbers")
        if self.margins.shape != self.weights.shape:
            raise CalibrationError(f"{self.margins.size} elimination margins for {self.weights.size} probes")
        if self.class_offsets is not None and (self.class_offsets.ndim != 2 or self.class_offsets.shape[1] != self.weights.size
                                               or not np.all(np.isfinite(self.class_offsets))):
            raise CalibrationError(f"class offsets of shape {self.class_offsets.shape} for {self.weights.size} probes; "
                                   "expected finite numbers [classes, probes]")


@dataclass
class RaceResult:
    """Per cell: extrapolated gaps ``[N,K]`` (0 for the leader), probes run per class, NFE, leader errors."""

    gaps: np.ndarray
    probes_run: np.ndarray
    nfe: np.ndarray
    leader_errors: np.ndarray  # [N, M] weighted errors of the final leader, NaN where not run
    null_errors: np.ndarray | None = None  # [N, M] weighted errors of the null class, NaN where not run

    @property
    def depth(self) -> np.ndarray:
        """Probes each cell's leader ran: 1 for a cell decided by the first probe."""
        return self.probes_run.max(1)

    def probabilities(self, temperature: float | np.ndarray) -> np.ndarray:
        """``softmax(−gaps / T)``; ``temperature`` one number or one per cell."""
        logits = -self.gaps / np.reshape(temperature, (-1, 1))
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)


def noise_bank(bundle: ModelBundle, count: int | None = None, seed: int | None = None) -> np.ndarray:
    """The seeded noise bank ``[P,3,S,S] float32`` the probes draw from (same on every machine: PCG64)."""
    cal = bundle.calibration
    if count is None:
        if cal is None:
            raise CalibrationError(f"{bundle.path}: no calibration, so no noise bank size; run `cytoedge calibrate`")
        count = cal.noise_bank_size
    if seed is None:
        seed = cal.noise_seed if cal is not None else 0
    channels, size = bundle.denoiser_shape
    return np.random.default_rng(seed).standard_normal((count, channels, size, size), dtype=np.float32)


def run_race(n_cells: int, n_classes: int, settings: RaceSettings, errors: ErrorSource,
             null_class: int | None = None) -> RaceResult:
    """Sequential elimination over the probes for ``n_cells`` cells; pure apart from ``errors``.

    With ``null_class`` (the id after the last class) each running cell's null-class error is
    measured at every probe too, in the same call; it takes no part in the race.
    """
    m = settings.weights.size
    offsets = np.zeros((n_classes, m)) if settings.class_offsets is None else settings.class_offsets
    if offsets.shape[0] != n_classes:
        raise CalibrationError(f"class offsets for {offsets.shape[0]} classes; the race has {n_classes}")
    alive = np.ones((n_cells, n_classes), bool)
    score = np.zeros((n_cells, n_classes))
    last = np.zeros((n_cells, n_classes), np.int64)  # probes each class has run
    weighted = np.full((n_cells, n_classes, m), np.nan)  # the race's score terms, offsets included
    raw = np.full((n_cells, n_classes, m), np.nan)  # weighted errors as measured: what the anomaly reads
    null_weighted = np.full((n_cells, m), np.nan) if null_class is not None else None
    nfe = np.zeros(n_cells, np.int64)
    cum_w = np.cumsum(settings.weights)
    for k in range(m):
        running = alive.sum(1) > 1 if k > 0 else np.ones(n_cells, bool)
        cell_idx, class_idx = np.nonzero(alive & running[:, None])
        if cell_idx.size == 0:
            break
        null_cells = np.flatnonzero(running) if null_class is not None else np.zeros(0, np.int64)
        e = errors(np.concatenate([cell_idx, null_cells]),
                   np.concatenate([class_idx, np.full(null_cells.size, null_class or 0)]), k)
        if not np.all(np.isfinite(e)):
            raise BackendError(f"non-finite denoising error at probe {k}")
        if null_weighted is not None:
            null_weighted[null_cells, k] = settings.weights[k] * e[cell_idx.size:]
            np.add.at(nfe, null_cells, 1)
        e = e[:cell_idx.size]
        w = settings.weights[k] * (e + offsets[class_idx, k])
        score[cell_idx, class_idx] += w
        weighted[cell_idx, class_idx, k] = w
        raw[cell_idx, class_idx, k] = settings.weights[k] * e
        last[cell_idx, class_idx] = k + 1
        np.add.at(nfe, cell_idx, 1)
        lead = np.where(alive, score, np.inf).min(1, keepdims=True)
        drop = alive & running[:, None] & (score - lead > settings.margins[k])
        alive &= ~drop
    gaps = np.zeros((n_cells, n_classes))
    leader = np.where(alive, score, np.inf).argmin(1)
    rows = np.arange(n_cells)
    for c in range(n_classes):
        k_c = np.maximum(last[:, c], 1)
        lead_at_k = np.nansum(np.where(np.arange(m)[None, :] < k_c[:, None], weighted[rows, leader], 0.0), axis=1)
        gaps[:, c] = (score[:, c] - lead_at_k) * cum_w[-1] / cum_w[k_c - 1]
    gaps[rows, leader] = 0.0
    return RaceResult(np.maximum(gaps, 0.0), last, nfe, raw[rows, leader], null_weighted)


class DenoiserErrorSource:
    """Measures probe errors for (cell, class) pairs with a backend; cuts (and, for a latent bundle,
    encodes) each cell's views once."""

    def __init__(self, batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, probes: list[Probe],
                 noise: np.ndarray):
        self.bundle, self.backend, self.probes, self.noise = bundle, backend, probes, noise
        self.mask = bundle.loss_mask()[None, None]
        encoder = create_encoder(bundle, backend)
        views = sorted({(p.angle, p.flip) for p in probes})
        self.view_index = {v: i for i, v in enumerate(views)}
        channels, size = bundle.denoiser_shape
        self.x0 = np.empty((len(views), len(batch), channels, size, size), np.float32)
        for (angle, flip), i in self.view_index.items():
            self.x0[i] = encoder.encode(batch.inputs(angle, flip, bundle))

    def __call__(self, cell_idx: np.ndarray, class_idx: np.ndarray, k: int) -> np.ndarray:
        p = self.probes[k]
        x0 = self.x0[self.view_index[(p.angle, p.flip)]]
        noise = self.noise[p.noise_index]
        uniq, inverse = np.unique(cell_idx, return_inverse=True)
        abar = np.full(uniq.size, self.bundle.schedule.alphas_cumprod[p.timestep], np.float32)
        xt = add_noise(x0[uniq], noise[None], abar)
        eps = self.backend.predict_noise(xt[inverse], np.full(cell_idx.size, p.timestep), class_idx)
        return masked_weighted_error(eps, noise[None], self.mask, np.ones(cell_idx.size, np.float32)).astype(np.float64)


def error_source_for(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend, probes: list[Probe],
                     noise: np.ndarray) -> ErrorSource:
    """The one place the probe loop's home is chosen: on the backend's device where it offers a device loop
    (runtime/device_errors.py) and the bundle scores pixels, else on the host (``DenoiserErrorSource``)."""
    loop = device_loop_of(backend)
    if loop is None:
        return DenoiserErrorSource(batch, bundle, backend, probes, noise)
    if bundle.is_latent:
        log.info("%s: latent bundle, its encoder runs on the host: probe loop on the host, not on %s's device",
                 bundle.path.name, backend.name)
        return DenoiserErrorSource(batch, bundle, backend, probes, noise)
    log.debug("probe loop on %s's device (%s kernels)", backend.name, loop.kernels.name)
    return DeviceErrorSource(batch, bundle, loop, probes, noise)


def probes_from_calibration(bundle: ModelBundle) -> tuple[list[Probe], RaceSettings]:
    """The bundle's calibrated probes, in race order, and the race's settings."""
    cal = bundle.calibration
    if cal is None:
        raise CalibrationError(f"{bundle.path} has no calibration; run `cytoedge calibrate --data DIR --model "
                               f"{bundle.path}` with labelled cells first")
    return list(cal.probes), RaceSettings(cal.probe_weights, cal.elimination_margins, cal.class_offsets)


def estimate(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend) -> RaceResult:
    """Run the calibrated race on every cell of ``batch``."""
    if len(batch) == 0:
        raise ValueError("empty cell batch: nothing to classify")
    probes, settings = probes_from_calibration(bundle)
    source = error_source_for(batch, bundle, backend, probes, noise_bank(bundle))
    return run_race(len(batch), len(bundle.class_names), settings, source, bundle.null_class_id)
