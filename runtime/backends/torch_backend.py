"""PyTorch reference backend: the bundle's UNet rebuilt in PyTorch from the ONNX graph's weights.

Used to check that the exported graph computes what the PyTorch network computes, and, on CUDA in
FP16, as a GPU backend with the on-device probe loop; needs the ``torch`` extra. The weights come from
the ONNX initialisers (one source of truth in the bundle).
"""
from __future__ import annotations

import logging

import numpy as np

from cytoedge.runtime.backends.checks import check_batch, check_device_batch, check_output
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")


def load_torch_denoiser(bundle: ModelBundle):
    """Rebuild the bundle's ``ClassConditionalUNet`` and load its weights from ``denoiser.onnx``."""
    try:
        import onnx
        import torch
        from onnx import numpy_helper

        from cytoedge.runtime.backends.torch_unet import ClassConditionalUNet, UNetConfig
    except ImportError as e:
        raise BackendError(f"the PyTorch backend needs the 'torch' extra (pip install 'cytoedge[torch]'): {e}") from e
    arch = bundle.manifest.get("architecture")
    if not arch or arch.get("kind") != "ClassConditionalUNet":
        raise BackendError(f"{bundle.path}: manifest has no 'architecture' of kind ClassConditionalUNet; "
                           "the PyTorch backend can only rebuild cytoedge's own UNet")
    model = ClassConditionalUNet(UNetConfig.from_dict(arch["config"]))
    graph = onnx.load(str(bundle.denoiser_path))
    weights = {init.name: numpy_helper.to_array(init) for init in graph.graph.initializer}
    state = model.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise BackendError(f"{bundle.denoiser_path}: weights {missing[:3]} (of {len(missing)}) not found among "
                           "the graph's initialisers; export with do_constant_folding=False")
    model.load_state_dict({k: torch.from_numpy(weights[k].copy()) for k in state})
    return model.eval()


class TorchBackend:
    """Eager PyTorch: on the CPU the reference the exported graphs are checked against; on CUDA (``device``
    "cuda[:i]", FP32 or ``precision="fp16"``) a GPU backend whose ``device_loop`` keeps the estimator's probe
    loop on the GPU (CuPy kernels, tensors exchanged by DLPack) where CuPy is installed."""

    def __init__(self, bundle: ModelBundle, max_batch: int = 256, threads: int | None = None, device: str = "cpu",
                 precision: str = "fp32", device_kernels=None):
        """``device_kernels``: the ``DeviceKernels`` of the device loop on CUDA (default: ``CupyKernels``
        built on first use)."""
        import torch

        if precision not in PRECISIONS:
            raise BackendError(f"PyTorch precision must be one of {PRECISIONS}, got {precision!r}")
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise BackendError(f"PyTorch device {device!r}: {e}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise BackendError(f"PyTorch device must be cpu or cuda[:index], got {device!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"PyTorch device {device!r} requested, but this PyTorch ({torch.__version__}) sees no "
                               "CUDA device")
        if precision == "fp16" and self.device.type != "cuda":
            raise BackendError("PyTorch FP16 needs a CUDA device (device='cuda')")
        if device_kernels is not None and self.device.type != "cuda":
            raise BackendError("device_kernels are for a CUDA device (device='cuda')")
        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.max_batch = max_batch
        self.precision = precision
        self.device_kind = self.device.type
        self.name = f"torch-{self.device.type}" + ("-fp16" if precision == "fp16" else "")
        self.model = load_torch_denoiser(bundle).to(self.device)
        self._loop = TorchCudaLoop(self, device_kernels) if device_kernels is not None else None
        self._loop_tried = False

    def _run(self, x_t, timestep, class_id):
        """ε̂ float32 on the model's device for torch tensors there, in chunks of ``max_batch``. FP16 is
        autocast's (convolutions and matmuls in FP16, normalisations in FP32): the UNet's sinusoidal time
        embedding is FP32, which a ``.half()`` model would refuse."""
        import torch

        outs = []
        with torch.inference_mode(), torch.autocast(self.device.type, torch.float16, enabled=self.precision == "fp16"):
            for s in range(0, x_t.shape[0], self.max_batch):
                sl = slice(s, s + self.max_batch)
                outs.append(self.model(x_t[sl], timestep[sl], class_id[sl]).float())
        return torch.cat(outs)

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        import torch

        x_t, timestep, class_id = check_batch(x_t, timestep, class_id, self.bundle.denoiser_shape,
                                              self.bundle.num_class_ids, self.bundle.schedule.num_train_timesteps)
        eps = self._run(*(torch.from_numpy(a).to(self.device) for a in (x_t, timestep, class_id)))
        return check_output(eps.cpu().numpy(), self.name)

    def device_loop(self) -> "TorchCudaLoop | None":
        """On CUDA with CuPy: the on-device probe loop; else None (the host loop), logged once. Only on the
        current CUDA device: the loop's own array work runs on CuPy's current device, which it does not set."""
        if self._loop is not None or self._loop_tried or self.device.type != "cuda":
            return self._loop
        import torch

        from cytoedge.kernels.cupy_runner import CupyKernels
        from cytoedge.kernels.cuda_runner import CudaUnavailable

        self._loop_tried = True
        index = torch.cuda.current_device() if self.device.index is None else self.device.index
        if index != torch.cuda.current_device():
            log.info("%s: probe loop on the host: cuda:%d is not the current CUDA device", self.name, index)
            return None
        try:
            self._loop = TorchCudaLoop(self, CupyKernels(index))
        except CudaUnavailable as why:
            log.info("%s: probe loop on the host: %s", self.name, why)
        return self._loop

    def close(self) -> None:
        if self._loop is not None:
            self._loop.kernels.close()
        self.model = self._loop = None


class TorchCudaLoop:
    """``DeviceLoop`` of a CUDA ``TorchBackend``: CuPy arrays in and out, the model on torch views of them
    (DLPack: no copy; each side's stream is handed to the other by the protocol)."""

    def __init__(self, backend: TorchBackend, kernels):
        self.backend, self.kernels = backend, kernels

    def predict_noise_device(self, x_t, timestep: np.ndarray, class_id: np.ndarray):
        import torch

        b = self.backend
        timestep, class_id = check_device_batch(x_t, timestep, class_id, b.bundle.denoiser_shape,
                                                b.bundle.num_class_ids, b.bundle.schedule.num_train_timesteps)
        ids = [torch.from_numpy(a).to(b.device) for a in (timestep, class_id)]
        eps = b._run(torch.from_dlpack(self.kernels.xp.ascontiguousarray(x_t)), *ids)
        return self.kernels.xp.from_dlpack(eps.contiguous())
