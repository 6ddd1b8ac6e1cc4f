"""ONNX Runtime backend: the embedded default (CPU), with the CUDA provider where one is present."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cytoedge.runtime.backends.checks import check_batch, check_output
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    return opts


class OnnxRuntimeBackend:
    """Runs the bundle's ``denoiser.onnx`` (or another graph of the same contract: ``model_path``, or the
    bundle's INT8 graph with ``precision="int8"``) through an ONNX Runtime session."""

    def __init__(self, bundle: ModelBundle, providers: list[str] | None = None, threads: int | None = None,
                 max_batch: int = 256, model_path: Path | None = None, precision: str = "fp32"):
        import onnxruntime as ort

        if precision not in ("fp32", "int8"):
            raise BackendError(f"ONNX Runtime precision must be 'fp32' or 'int8', got {precision!r}")
        self.bundle = bundle
        self.max_batch = max_batch
        if model_path is None and precision == "int8":
            model_path = bundle.network_path("denoiser_int8")
            if model_path is None:
                raise BackendError(f"{bundle.path} has no INT8 graph; run `cytoedge quantize --model {bundle.path}`")
        path = Path(model_path or bundle.denoiser_path)
        requested = providers or ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        missing = [p for p in requested if p not in available]
        if missing:
            raise BackendError(f"ONNX Runtime providers {missing} are not available here (available: {available})")
        try:
            self.session = ort.InferenceSession(str(path), session_options(threads), providers=requested)
        except Exception as e:  # ORT raises its own untyped errors for unreadable graphs
            raise BackendError(f"ONNX Runtime could not load {path}: {e}") from e
        # onnxruntime-gpu falls back to the CPU silently when CUDA libraries are missing: report what runs.
        self.providers = self.session.get_providers()
        self.name = "onnxruntime-" + ("cuda" if "CUDAExecutionProvider" in self.providers else "cpu") \
            + ("-int8" if precision == "int8" else "")
        log.info("ONNX Runtime session on %s with providers %s", path.name, self.providers)
        self._input_names = [i.name for i in self.session.get_inputs()]
        expected = ["x_t", "timestep", "class_id"]
        if self._input_names != expected:
            raise BackendError(f"{path}: inputs are {self._input_names}; the denoiser contract is {expected}")
        self._num_classes = bundle.num_class_ids

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        x_t, timestep, class_id = check_batch(x_t, timestep, class_id, self.bundle.denoiser_shape, self._num_classes,
                                              self.bundle.schedule.num_train_timesteps)
        outs = []
        for s in range(0, x_t.shape[0], self.max_batch):
            feed = {"x_t": x_t[s:s + self.max_batch], "timestep": timestep[s:s + self.max_batch],
                    "class_id": class_id[s:s + self.max_batch]}
            outs.append(self.session.run(None, feed)[0])
        return check_output(np.concatenate(outs).astype(np.float32, copy=False), self.name)

    def close(self) -> None:
        self.session = None
