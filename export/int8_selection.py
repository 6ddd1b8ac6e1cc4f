"""Which convolutions may run in INT8: how far quantising each one moves the classifier's scores.

The fast estimator races classes on running scores ``S_c(k) = Σ_{j≤k} w_j · e_cj`` (calibrated probe
weights ``w``, masked denoising errors ``e``): after probe k a class trailing by more than the margin
``m_k`` is dropped, and the survivors' gaps are read through ``softmax(−gap / T)``. Quantisation
damage is therefore measured where decisions are made: per probe k, the RMS shift of every cell's
running class scores, centred per cell (a shift shared by all classes changes nothing), in units of
the temperature ``T``. The first probe matters most: ~85 % of cells are decided by it, and a cell
whose runner-up sits just inside the first margin changes its decision for a tiny shift there (on the
bundled model, a graph chosen by the total shift alone moved the first probe by 0.03 T and changed 14
of 2631 decisions, nearly all by a different elimination after probe 1).

Each convolution is quantised alone and measured. Shifts of different convolutions add almost
independently (bundled model, root-sum-square prediction vs measured total: 0.152 vs 0.174, 0.055
vs 0.056, 0.041 vs 0.041), so the predicted shift of an INT8 set is, per probe, the root-sum-square of
its members'. Greedy choice: keep FP32, one at a time, the convolution with the largest squared shift
per multiply-accumulate at the probe that is furthest over budget; then build the chosen graph and
measure its real shift.
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
from cytoedge.runtime.errors import BundleError, CalibrationError
from cytoedge.runtime.estimator import noise_bank, probes_from_calibration

log = logging.getLogger(__name__)

# Provenance of the budget (bundled model, all 2631 pbc/calib cells, fast estimator): decisions that
# differ from FP32 grew with the first probe's shift: 0.034 T → 14, 0.027 → 12, 0.022 → 8, 0.015 → 7
# (budgets 0.05, 0.035, 0.03, 0.02; 7, 11, 12, 17 convolutions FP32; 2.28×, 2.07×, 1.99×, 1.64× PyTorch
# eager at batch 64). 0.035 is the largest budget that met the 99.5 % bar. The decision check on
# labelled cells, not the budget, decides whether a graph may be used.
DEFAULTS = {"max_score_shift": 0.035, "score_cells": 64, "calibration_batches": 32, "calibration_batch": 32,
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
                       cells=n, classes=k, temperature=bundle.calibration.temperature)


def class_scores(bundle: ModelBundle, graph: Path, inputs: ScoreInputs, threads: int | None = None) -> np.ndarray:
    """``[cells, classes, probes]``: each class's weighted masked error at each probe, ``graph`` on ORT CPU."""
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    eps = OnnxRuntimeBackend(bundle, threads=threads, model_path=graph).predict_noise(inputs.x_t, inputs.timestep,
                                                                                       inputs.class_id)
    mask = bundle.loss_mask()[None, None]
    e = masked_weighted_error(eps, inputs.noise, mask, np.ones(len(eps), np.float32)) * inputs.weight
    return e.reshape(-1, inputs.classes, inputs.cells).transpose(2, 1, 0)


def score_shift(scores: np.ndarray, reference: np.ndarray, temperature: float) -> np.ndarray:
    """Per probe k: RMS over cells and classes of the change of the running score after k probes
    (what elimination after probe k compares with its margin), centred per cell, in temperatures."""
    d = np.cumsum(scores - reference, axis=2)
    d = d - d.mean(1, keepdims=True)
    return np.sqrt((d ** 2).mean((0, 1))) / temperature


def predicted_shift(shift: dict[str, np.ndarray], fp32: list[str]) -> np.ndarray:
    """Per probe: root-sum-square shift of the convolutions not in ``fp32``."""
    size = len(next(iter(shift.values())))
    return np.sqrt(sum((np.asarray(v) ** 2 for c, v in shift.items() if c not in fp32), np.zeros(size)))


def choose_fp32_convs(shift: dict[str, np.ndarray], macs: dict[str, int], budget: float) -> list[str]:
    """Few MACs kept FP32 so that the predicted shift after every probe is at most ``budget``: greedy,
    each step keeping the convolution with the largest squared shift per MAC at the worst probe."""
    missing = sorted(set(shift) ^ set(macs))
    if missing:
        raise ValueError(f"shift and MAC tables name different convolutions: {missing[:5]}")
    kept: list[str] = []
    while len(kept) < len(shift):
        predicted = predicted_shift(shift, kept)
        if predicted.max() <= budget:
            break
        worst = int(predicted.argmax())
        kept.append(max((c for c in shift if c not in kept),
                        key=lambda c: (shift[c][worst] ** 2 / max(macs[c], 1), c)))
    return kept


def check_selection_inputs(bundle: ModelBundle, candidates: list[str] | None = None) -> list[str]:
    """What select_and_quantize refuses, checked before any work: a calibrated bundle, and candidate
    names that are Conv nodes of its FP32 denoiser. Returns the candidates (every Conv node by default)."""
    import onnx

    if not bundle.calibration:
        raise CalibrationError(f"{bundle.path} has no calibration: INT8 selection measures the calibrated class "
                               f"scores; run `cytoedge calibrate --model {bundle.path}` first")
    src = bundle.denoiser_path
    convs = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "Conv"]
    if not convs:
        raise BundleError(f"{src}: the denoiser has no Conv node to quantise")
    unknown = sorted(set(candidates or []) - set(convs))
    if unknown:
        raise BundleError(f"{src}: no Conv node named {unknown} (--convs takes names as in the ONNX graph, "
                          f"e.g. {convs[0]!r})")
    return list(candidates) if candidates is not None else convs


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
    macs = conv_macs(src, {"x_t": inputs.x_t[:1], "timestep": inputs.timestep[:1], "class_id": inputs.class_id[:1]})
    unknown = sorted(set(candidates or []) - set(macs))
    if unknown:
        raise BundleError(f"{src}: no Conv node named {unknown} (--convs takes names as in the ONNX graph, "
                          f"e.g. {next(iter(macs))!r})")
    pinned = [c for c in macs if candidates is not None and c not in candidates]
    macs_c = {c: m for c, m in macs.items() if c not in pinned}
    reference = class_scores(bundle, src, inputs, threads)
    with tempfile.TemporaryDirectory(prefix="cytoedge-int8-") as tmp:
        ranges, trial = Path(tmp) / "ranges.json", Path(tmp) / "trial.onnx"
        shift = {}
        for conv in macs_c:
            quantize_int8(src, trial, feeds, [c for c in macs if c != conv], s["method"], ranges)
            shift[conv] = score_shift(class_scores(bundle, trial, inputs, threads), reference, inputs.temperature).tolist()
            if progress:
                progress(conv)
        fp32 = pinned + choose_fp32_convs(shift, macs_c, s["max_score_shift"])
        quantize_int8(src, dst, feeds, fp32, s["method"], ranges)
    measured = score_shift(class_scores(bundle, dst, inputs, threads), reference, inputs.temperature)
    predicted = predicted_shift(shift, fp32)
    log.info("INT8: %d of %d convolutions FP32, score shift per probe %s T (predicted %s)", len(fp32), len(macs),
             np.round(measured, 4), np.round(predicted, 4))
    return {"settings": s, "fp32_convs": fp32, "convs": len(macs),
            "fp32_mac_share": sum(macs[c] for c in fp32) / sum(macs.values()),
            "predicted_score_shift": predicted.tolist(), "measured_score_shift": measured.tolist(),
            "score_shift_per_conv": shift, "macs_per_conv": macs,
            "calibration_cells": int(len(x0_calibration)), "score_cells": int(inputs.cells)}
