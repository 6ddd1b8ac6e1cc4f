"""CytoDiffusion's public classification protocol, re-implemented: the baseline for every speed-up.

Per cell, trial i uses timestep ``ts[i]`` from ``linspace(1, 999, N)`` shuffled, one Gaussian noise
shared by all classes still in the race, and a random rotation/flip of the input. The score of a
class is the masked squared error of its noise prediction, every timestep weighed alike. From trial
``first_test`` on, every ``test_every`` trials, a one-sided paired t-test of each class against the
current best drops it when p < ``p_drop``; the race ends when one class remains or after N trials.

Cells advance in lockstep so one backend call carries many (cell, class) pairs; each cell keeps its
own random stream, so its result does not depend on which cells share its batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from cytoedge.kernels import masked_weighted_error
from cytoedge.runtime.backends import DenoiserBackend
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.cells import CellBatch, model_inputs
from cytoedge.runtime.encoders import create_encoder


@dataclass(frozen=True)
class ReferenceSettings:
    n_trials: int = 2000
    first_test: int = 20
    test_every: int = 5
    p_drop: float = 2e-3
    seed: int = 0


@dataclass
class ReferenceResult:
    """Per cell: predicted class id (best of the classes left), each class's mean error over the
    trials it ran, whether it survived the race, NFE and trials."""

    class_id: np.ndarray
    mean_error: np.ndarray
    survived: np.ndarray
    nfe: np.ndarray
    trials: np.ndarray


@dataclass
class _CellRace:
    rng: np.random.Generator
    timesteps: np.ndarray
    alive: np.ndarray
    errors: list[np.ndarray] = field(default_factory=list)
    nfe: int = 0

    @property
    def done(self) -> bool:
        return self.alive.sum() <= 1 or len(self.errors) >= len(self.timesteps)


def paired_drop(errors: np.ndarray, alive: np.ndarray, p_drop: float) -> np.ndarray:
    """Classes to keep after one-sided paired t-tests against the current best (``errors [trials, K]``)."""
    means = np.where(alive, errors.mean(0), np.inf)
    best = int(np.argmin(means))
    keep = alive.copy()
    n = errors.shape[0]
    for c in np.flatnonzero(alive):
        if c == best:
            continue
        d = errors[:, c] - errors[:, best]
        sd = d.std(ddof=1)
        if sd == 0:
            p = 0.0 if d.mean() > 0 else 1.0
        else:
            p = float(stats.t.sf(d.mean() / (sd / np.sqrt(n)), df=n - 1))
        if p < p_drop and d.mean() > 0:
            keep[c] = False
    return keep


def classify_reference(batch: CellBatch, bundle: ModelBundle, backend: DenoiserBackend,
                       settings: ReferenceSettings = ReferenceSettings(),
                       progress=None) -> ReferenceResult:
    """Run the reference protocol on every cell of ``batch``."""
    k = len(bundle.class_names)
    channels, model_size = bundle.denoiser_shape
    encoder = create_encoder(bundle, backend)
    mask = bundle.loss_mask()[None, None]
    base_ts = np.linspace(1, bundle.schedule.num_train_timesteps - 1, settings.n_trials).round().astype(np.int64)
    races = []
    for i in range(len(batch)):
        rng = np.random.default_rng([settings.seed, i])
        races.append(_CellRace(rng, rng.permutation(base_ts), np.ones(k, bool)))
    while True:
        active = [i for i, r in enumerate(races) if not r.done]
        if not active:
            break
        rows, noises, ts, cls, owner = [], [], [], [], []
        for i in active:
            r = races[i]
            row = batch.cells[i].copy()
            row[3] = r.rng.uniform(0, 2 * np.pi)
            row[4] = float(r.rng.random() < 0.5)
            rows.append(row)
            noises.append(r.rng.standard_normal((channels, model_size, model_size)).astype(np.float32))
            ts.append(r.timesteps[len(r.errors)])
        x0 = encoder.encode(model_inputs(batch.tiles, np.stack(rows), bundle))
        xt = bundle.schedule.add_noise(x0, np.stack(noises), np.asarray(ts))
        xin = []
        for j, i in enumerate(active):
            for c in np.flatnonzero(races[i].alive):
                xin.append(j)
                cls.append(c)
                owner.append(i)
        xin = np.asarray(xin)
        eps = backend.predict_noise(xt[xin], np.asarray(ts)[xin], np.asarray(cls))
        err = masked_weighted_error(eps, np.stack(noises)[xin], mask, np.ones(len(xin), np.float32)).astype(np.float64)
        for j, i in enumerate(active):
            r = races[i]
            sel = xin == j
            trial = np.full(k, np.nan)
            trial[np.asarray(cls)[sel]] = err[sel]
            r.errors.append(trial)
            r.nfe += int(sel.sum())
            n = len(r.errors)
            if n >= settings.first_test and (n - settings.first_test) % settings.test_every == 0:
                r.alive = paired_drop(_complete(np.stack(r.errors), r.alive), r.alive, settings.p_drop)
        if progress is not None:
            progress(sum(r.done for r in races))
    return _summarise(races, k)


def _complete(errors: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Errors of the classes still alive (they were evaluated at every trial so far)."""
    out = errors.copy()
    out[:, ~alive] = 0.0
    return out


def _summarise(races: list[_CellRace], k: int) -> ReferenceResult:
    n = len(races)
    mean_error = np.stack([np.nanmean(np.stack(r.errors), axis=0) for r in races]).reshape(n, k)
    survived = np.stack([r.alive for r in races]).reshape(n, k)
    class_id = np.where(survived, mean_error, np.inf).argmin(1)
    return ReferenceResult(class_id, mean_error, survived, np.array([r.nfe for r in races]),
                           np.array([len(r.errors) for r in races]))
