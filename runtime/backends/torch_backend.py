"""PyTorch reference backend: the bundle's UNet rebuilt in PyTorch from the ONNX graph's weights.

Used to check that the exported graph computes what the PyTorch network computes; needs the
``torch`` extra. The weights come from the ONNX initialisers (one source of truth in the bundle).
"""
from __future__ import annotations

import numpy as np

from cytoedge.runtime.backends.checks import check_batch, check_output
from cytoedge.runtime.bundle import ModelBundle
from cytoedge.runtime.errors import BackendError


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
    """Eager PyTorch on the CPU: slow, but the reference the exported graphs are checked against."""

    name = "torch-cpu"

    def __init__(self, bundle: ModelBundle, max_batch: int = 256, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.max_batch = max_batch
        self.model = load_torch_denoiser(bundle)

    def predict_noise(self, x_t: np.ndarray, timestep: np.ndarray, class_id: np.ndarray) -> np.ndarray:
        import torch

        x_t, timestep, class_id = check_batch(x_t, timestep, class_id, self.bundle.denoiser_shape,
                                              self.bundle.num_class_ids, self.bundle.schedule.num_train_timesteps)
        outs = []
        with torch.inference_mode():
            for s in range(0, x_t.shape[0], self.max_batch):
                sl = slice(s, s + self.max_batch)
                outs.append(self.model(torch.from_numpy(x_t[sl]), torch.from_numpy(timestep[sl]),
                                       torch.from_numpy(class_id[sl])).numpy())
        return check_output(np.concatenate(outs), self.name)

    def close(self) -> None:
        self.model = None
