"""One small spec per exported network: tensor names, dtypes, shapes, dynamic axes, batch profiles.

The same spec drives the ONNX export (input/output names, dynamic axes), the TensorRT build
(optimisation profiles) and the TensorRT backend (device buffers allocated once per profile), so
the three cannot disagree about a tensor's name or shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BATCH = "batch"

# Batch sizes the estimators send: the race shrinks from (cells × classes) towards single pairs.
DEFAULT_PROFILE_BATCHES = (1, 8, 64, 256)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor; ``shape`` uses ``BATCH`` for the dynamic batch axis and ints elsewhere."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def nbytes(self, batch: int) -> int:
        return int(np.prod(self.concrete(batch))) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BatchProfile:
    """One TensorRT optimisation profile: batch sizes min ≤ opt ≤ max."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[BatchProfile, ...] = field(default_factory=tuple)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s dynamic_axes: every axis named ``BATCH``."""
        return {t.name: {i: BATCH for i, d in enumerate(t.shape) if d == BATCH}
                for t in self.inputs + self.outputs if BATCH in t.shape}

    def profile_for(self, batch: int) -> int:
        """Index of the smallest profile whose range holds ``batch`` (TensorRT runs one profile per context)."""
        fitting = [i for i, p in enumerate(self.profiles) if p.covers(batch)]
        if not fitting:
            raise ValueError(f"{self.name}: batch {batch} is outside every profile "
                             f"{[p.to_dict() for p in self.profiles]}")
        return min(fitting, key=lambda i: self.profiles[i].max)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkSpec":
        def tensors(items):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]),
                   tuple(BatchProfile(p["min"], p["opt"], p["max"]) for p in d["profiles"]))

    def to_dict(self) -> dict:
        return {"name": self.name,
                "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
                "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
                "profiles": [p.to_dict() for p in self.profiles]}


def profiles_for_batches(batches: tuple[int, ...] = DEFAULT_PROFILE_BATCHES) -> tuple[BatchProfile, ...]:
    """Contiguous profiles, one per batch size the estimator uses: (prev+1, b, b)."""
    out, low = [], 1
    for b in sorted(set(int(x) for x in batches)):
        out.append(BatchProfile(low, b, b))
        low = b + 1
    return tuple(out)


def denoiser_spec(image_size: int, channels: int = 3,
                  batches: tuple[int, ...] = DEFAULT_PROFILE_BATCHES) -> NetworkSpec:
    """The bundle's denoiser contract: ε̂ = f(x_t, timestep, class_id)."""
    image = (BATCH, channels, image_size, image_size)
    return NetworkSpec("denoiser",
                       (TensorSpec("x_t", "float32", image), TensorSpec("timestep", "int64", (BATCH,)),
                        TensorSpec("class_id", "int64", (BATCH,))),
                       (TensorSpec("eps", "float32", image),), profiles_for_batches(batches))


def fused_error_spec(image_size: int, channels: int = 3,
                     batches: tuple[int, ...] = DEFAULT_PROFILE_BATCHES) -> NetworkSpec:
    """Noising + denoiser + masked weighted error in one graph: only ``[B]`` scalars leave the device."""
    image = (BATCH, channels, image_size, image_size)
    return NetworkSpec("denoiser_error",
                       (TensorSpec("x0", "float32", image), TensorSpec("noise", "float32", image),
                        TensorSpec("timestep", "int64", (BATCH,)), TensorSpec("class_id", "int64", (BATCH,)),
                        TensorSpec("weight", "float32", (BATCH,))),
                       (TensorSpec("error", "float32", (BATCH,)),), profiles_for_batches(batches))


def vae_encoder_spec(image_size: int, latent_channels: int, latent_size: int,
                     batches: tuple[int, ...] = DEFAULT_PROFILE_BATCHES) -> NetworkSpec:
    """Latent-diffusion image encoder: RGB in [-1, 1] → scaled latent mean."""
    return NetworkSpec("vae_encoder", (TensorSpec("image", "float32", (BATCH, 3, image_size, image_size)),),
                       (TensorSpec("latent", "float32", (BATCH, latent_channels, latent_size, latent_size)),),
                       profiles_for_batches(batches))
