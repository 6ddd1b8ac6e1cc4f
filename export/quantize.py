"""FP32 ONNX → INT8 (QDQ) ONNX for CPUs with VNNI: the convolutions, which are ~80 % of the CPU time.

Static quantisation: activation ranges are calibrated on noised inputs the estimator actually
sends (x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε for real cells x_0 at the timesteps of the bundle's calibrated
probes, or over the whole schedule for an uncalibrated bundle; every class id, null class included);
weights are quantised per output channel, activation ranges clipped at the 99.999th percentile.
The first convolution (image in) and the last ``KEEP_FP32_LAST`` (where the predicted noise is formed)
stay FP32: quantising them cost the most decision agreement for the least time (on the previous
bundled model, all 2631 pbc/calib cells: last 4 FP32 → 99.24 % agreement, last 6 → 99.51 %). Whether the INT8 graph may be used is decided by decision agreement with FP32
(``benchmarks/bench_backends.py``), never by speed alone.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import ModelBundle

log = logging.getLogger(__name__)

KEEP_FP32_FIRST = 1
KEEP_FP32_LAST = 6


def calibration_feeds(bundle: ModelBundle, x0: np.ndarray, batches: int = 8, batch: int = 32,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded (x_t, timestep, class_id) batches built from clean model inputs ``x0 [N,3,S,S]``."""
    rng = np.random.default_rng(seed)
    probes = (bundle.calibration or {}).get("probes")
    timesteps = (np.array([p["timestep"] for p in probes]) if probes
                 else np.arange(bundle.schedule.num_train_timesteps))
    feeds = []
    for _ in range(batches):
        pick = rng.integers(0, len(x0), batch)
        t = rng.choice(timesteps, batch).astype(np.int64)
        noise = rng.standard_normal(x0[pick].shape).astype(np.float32)
        feeds.append({"x_t": bundle.schedule.add_noise(x0[pick], noise, t).astype(np.float32), "timestep": t,
                      "class_id": rng.integers(0, bundle.num_class_ids, batch).astype(np.int64)})
    return feeds


def boundary_convs(onnx_path: Path, first: int = KEEP_FP32_FIRST, last: int = KEEP_FP32_LAST) -> list[str]:
    """Names of the first ``first`` and last ``last`` Conv nodes (kept in FP32)."""
    import onnx

    convs = [n.name for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "Conv"]
    return convs[:first] + convs[len(convs) - last:]


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], keep_first: int = KEEP_FP32_FIRST,
                  keep_last: int = KEEP_FP32_LAST, method: str = "percentile") -> Path:
    """Write the INT8 QDQ copy of ``src`` to ``dst`` (convolutions only, per-channel weights; the
    first ``keep_first`` and last ``keep_last`` convolutions FP32; activation ranges by ``method``:
    percentile, entropy or minmax)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    methods = {"percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy,
               "minmax": CalibrationMethod.MinMax}
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv"], nodes_to_exclude=boundary_convs(src, keep_first, keep_last),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method])
    log.info("INT8 graph %s (calibrated on %d batches)", dst, len(feeds))
    return dst
