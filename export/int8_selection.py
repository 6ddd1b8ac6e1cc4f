"""Which convolutions may run in INT8: how far quantising each one moves the classifier's scores.

The fast estimator decides from class scores ``S_c = Σ_k w_k · e_ck`` (calibrated probe weights
``w``, masked denoising errors ``e``) read through ``softmax(−gap / T)``. So quantisation damage is
measured where decisions are made: the RMS shift of every cell's class scores, centred per cell (a
shift shared by all classes changes no decision), in units of the calibrated temperature ``T``.

Each convolution is quantised alone and its shift measured. Shifts of different convolutions add
almost independently (bundled model, measured vs root-sum-square prediction: 0.174 vs 0.152 for the
old "first + last 6 FP32" rule, 0.056 vs 0.055 and 0.041 vs 0.041 for greedy choices), so the
predicted shift of an INT8 set is the root-sum-square of its members' shifts. Greedy choice: keep
FP32 the convolutions with the largest squared shift per multiply-accumulate saved, until the rest
is predicted within the budget; then the chosen graph is built and its real shift measured.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cytoedge.export.quantize import calibration_feeds, conv_macs, quantize_int8
from cytoedge.kernels import add_noise, masked_weighted_error
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import CalibrationError
from cytoedge.runtime.estimator import noise_bank, probes_from_calibration

log = logging.getLogger(__name__)

# Provenance of these defaults: on the bundled model a budget of 0.05·T keeps 7 of 43 convolutions
# FP32 (20 % of the MACs); decision agreement with FP32 is then checked on labelled cells, and that
# check, not the budget, decides whether the graph may be used.
DEFAULTS = {"max_score_shift": 0.05, "score_cells": 64, "calibration_batches": 32, "calibration_batch": 32,
            "method": "percentile"}


@dataclass
class ScoreInputs:
    """Denoiser inputs for ``cells`` cells × every class × the calibrated probes, and what scores them."""

    x_t: np.ndarray
    timestep: np.ndarray
    class_id: np.ndarray
    noise: np.ndarray
    weight: np.ndarray  # the probe weight of each sample
    cells: int
    classes: int
    temperature: float


def score_inputs(bundle: ModelBundle, x0: np.ndarray) -> ScoreInputs:
    """The samples whose class scores the sensitivity compares (clean inputs ``x0``, unrotated views)."""
    if not bundle.calibration:
        raise CalibrationError(f"{bundle.path} has no calibration: INT8 selection measures the calibrated class "
                               f"scores; run `cytoedge calibrate --model {bundle.path}` first")
    probes, settings = probes_from_calibration(bundle)
    bank = noise_bank(bundle)
    n, k = len(x0), len(bundle.class_names)
    parts: dict[str, list[np.ndarray]] = {"x_t": [], "timestep": [], "class_id": [], "noise": [], "weight": []}
    for probe, w in zip(probes, settings.weights):
        noise = bank[probe.noise_index]
        abar = np.full(n, bundle.schedule.alphas_cumprod[probe.timestep], np.float32)
        xt = add_noise(x0, noise[None], abar)
        parts["x_t"].append(np.tile(xt, (k, 1, 1, 1)))
        parts["timestep"].append(np.full(n * k, probe.timestep, np.int64))
        parts["class_id"].append(np.repeat(np.arange(k, dtype=np.int64), n))
        parts["noise"].append(np.broadcast_to(noise, (n * k, *noise.shape)))
        parts["weight"].append(np.full(n * k, w))
    return ScoreInputs(*(np.concatenate(parts[name]) for name in ("x_t", "timestep", "class_id", "noise", "weight")),
                       cells=n, classes=k, temperature=settings.temperature)


def class_scores(graph: Path, inputs: ScoreInputs, mask: np.ndarray, threads: int | None = None,
                 batch: int = 256) -> np.ndarray:
    """``S [cells, classes]``: each class's weighted masked error summed over the probes, run on ORT CPU."""
    import onnxruntime as ort

    from cytoedge.runtime.backends.onnxruntime_backend import session_options

    session = ort.InferenceSession(str(graph), session_options(threads), providers=["CPUExecutionProvider"])
    eps = np.concatenate([session.run(None, {"x_t": inputs.x_t[s:s + batch], "timestep": inputs.timestep[s:s + batch],
                                             "class_id": inputs.class_id[s:s + batch]})[0]
                          for s in range(0, len(inputs.x_t), batch)])
    e = masked_weighted_error(eps, inputs.noise, mask[None, None], np.ones(len(eps), np.float32)) * inputs.weight
    return e.reshape(-1, inputs.classes, inputs.cells).sum(0).T


def score_shift(scores: np.ndarray, reference: np.ndarray, temperature: float) -> float:
    """RMS over cells and classes of the per-cell-centred score change, in units of the temperature."""
    d = scores - reference
    d = d - d.mean(1, keepdims=True)
    return float(np.sqrt((d ** 2).mean()) / temperature)


def choose_fp32_convs(shift: dict[str, float], macs: dict[str, int], budget: float) -> list[str]:
    """Fewest MACs kept FP32 (greedy by squared shift per MAC) so that the root-sum-square shift of the
    convolutions left in INT8 is at most ``budget``."""
    missing = sorted(set(shift) ^ set(macs))
    if missing:
        raise ValueError(f"shift and MAC tables name different convolutions: {missing[:5]}")
    order = sorted(shift, key=lambda c: (-shift[c] ** 2 / max(macs[c], 1), c))
    kept: list[str] = []
    for conv in order:
        if predicted_shift(shift, kept) <= budget:
            break
        kept.append(conv)
    return kept


def predicted_shift(shift: dict[str, float], fp32: list[str]) -> float:
    """Root-sum-square shift of the convolutions not in ``fp32``."""
    return float(np.sqrt(sum(v ** 2 for c, v in shift.items() if c not in fp32)))


def select_and_quantize(bundle: ModelBundle, x0_calibration: np.ndarray, x0_scores: np.ndarray, dst: Path,
                        settings: dict | None = None, threads: int | None = None, candidates: list[str] | None = None,
                        progress: Callable[[str], None] | None = None) -> dict:
    """Measure each candidate convolution's shift, choose the FP32 set, write the INT8 graph to ``dst``.

    ``x0_calibration`` (activation ranges) and ``x0_scores`` (the shift measure) are clean denoiser
    inputs of labelled training cells; ``candidates`` limits which convolutions may become INT8 (all by
    default; the others stay FP32). Returns the report stored beside the graph.
    """
    s = {**DEFAULTS, **(settings or {})}
    src = bundle.denoiser_path
    feeds = calibration_feeds(bundle, x0_calibration, s["calibration_batches"], s["calibration_batch"])
    inputs = score_inputs(bundle, x0_scores[: s["score_cells"]])
    mask = bundle.loss_mask()
    macs = conv_macs(src, {"x_t": inputs.x_t[:1], "timestep": inputs.timestep[:1], "class_id": inputs.class_id[:1]})
    unknown = sorted(set(candidates or []) - set(macs))
    if unknown:
        raise ValueError(f"{src}: no convolution named {unknown}")
    pinned = [c for c in macs if candidates is not None and c not in candidates]
    macs_c = {c: m for c, m in macs.items() if c not in pinned}
    reference = class_scores(src, inputs, mask, threads)
    with tempfile.TemporaryDirectory(prefix="cytoedge-int8-") as tmp:
        ranges, trial = Path(tmp) / "ranges.json", Path(tmp) / "trial.onnx"
        shift = {}
        for conv in macs_c:
            quantize_int8(src, trial, feeds, [c for c in macs if c != conv], s["method"], ranges)
            shift[conv] = score_shift(class_scores(trial, inputs, mask, threads), reference, inputs.temperature)
            if progress:
                progress(conv)
        fp32 = pinned + choose_fp32_convs(shift, macs_c, s["max_score_shift"])
        quantize_int8(src, dst, feeds, fp32, s["method"], ranges)
    measured = score_shift(class_scores(dst, inputs, mask, threads), reference, inputs.temperature)
    log.info("INT8: %d of %d convolutions FP32, score shift %.4f T (predicted %.4f)", len(fp32), len(macs),
             measured, predicted_shift(shift, fp32))
    return {"settings": s, "fp32_convs": fp32, "convs": len(macs),
            "fp32_mac_share": sum(macs[c] for c in fp32) / sum(macs.values()),
            "predicted_score_shift": predicted_shift(shift, fp32), "measured_score_shift": measured,
            "score_shift_per_conv": shift, "macs_per_conv": macs,
            "calibration_cells": int(len(x0_calibration)), "score_cells": int(inputs.cells)}
