"""FP32 ONNX → INT8 (QDQ) ONNX for CPUs with VNNI: the convolutions, which are ~75 % of the CPU time.

Static quantisation: activation ranges are calibrated on noised inputs the estimator actually
sends (x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε for real cells x_0 at the timesteps of the bundle's calibrated
probes, or over the whole schedule for an uncalibrated bundle; every class id, null class included);
weights are quantised per output channel, activation ranges clipped at the 99.999th percentile.
Which convolutions stay FP32 is decided per network by ``export/int8_selection.py`` (how far
quantising each one moves the classifier's scores), never by position: on the bundled model one
convolution in the middle of the decoder moves them more than all the others together.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.bundle import ModelBundle

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("percentile", "entropy", "minmax")


def calibration_feeds(bundle: ModelBundle, x0: np.ndarray, batches: int = 32, batch: int = 32,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded (x_t, timestep, class_id) batches built from clean denoiser inputs ``x0 [N,C,S,S]``."""
    rng = np.random.default_rng(seed)
    timesteps = (np.array([p.timestep for p in bundle.calibration.probes]) if bundle.calibration is not None
                 else np.arange(bundle.schedule.num_train_timesteps))
    feeds = []
    for _ in range(batches):
        pick = rng.integers(0, len(x0), batch)
        t = rng.choice(timesteps, batch).astype(np.int64)
        noise = rng.standard_normal(x0[pick].shape).astype(np.float32)
        feeds.append({"x_t": bundle.schedule.add_noise(x0[pick], noise, t).astype(np.float32), "timestep": t,
                      "class_id": rng.integers(0, bundle.num_class_ids, batch).astype(np.int64)})
    return feeds


def conv_macs(onnx_path: Path, feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv node, in graph order (the cost INT8 saves).

    Output sizes are read from one ONNX Runtime run on ``feed`` (batch 1) with every convolution's
    output exposed: static shape inference loses them after Resize and data-dependent Reshapes.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n.output[0]) for n in convs
                              if n.output[0] not in known)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    shapes = dict(zip(names, (o.shape for o in session.run(None, {k: v[:1] for k, v in feed.items()}))))
    macs = {}
    for node in convs:
        w = weights.get(node.input[1])
        if w is None:
            raise ValueError(f"{onnx_path}: Conv {node.name!r} has no constant weight; cannot quantise it per channel")
        macs[node.name] = int(np.prod(w) * np.prod(shapes[node.output[0]][2:]))  # Cout·Cin/g·kh·kw × Hout·Wout
    return macs


def quantize_int8(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], fp32_convs: list[str],
                  method: str = "percentile", range_cache: Path | None = None) -> Path:
    """Write the INT8 QDQ copy of ``src`` to ``dst``: every convolution but ``fp32_convs``, per-channel
    weights, activation ranges by ``method``. ``range_cache`` (a JSON file) keeps the calibrated
    ranges, so trying many choices of FP32 convolutions calibrates once."""
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
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(str(src), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv"], nodes_to_exclude=list(fp32_convs),
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=methods[method],
                    calibration_cache_path=str(range_cache) if range_cache else None)
    log.info("INT8 graph %s (%d convolutions kept FP32)", dst, len(fp32_convs))
    return dst
