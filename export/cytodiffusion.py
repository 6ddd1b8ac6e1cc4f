"""CytoDiffusion-format checkpoints (a diffusers folder) → cytoedge bundle with ONNX networks.

CytoDiffusion fine-tunes Stable Diffusion 1.5 with class conditioning: the text encoder is
replaced by a one-hot class vector, zero-padded to the context width (768) and repeated over the
77 context tokens. The folder holds ``unet/`` (UNet2DConditionModel), ``vae/`` (AutoencoderKL) and
``scheduler/``; nothing is downloaded (``local_files_only``, ``HF_HUB_OFFLINE``).

Because all context tokens of a class are identical, every cross-attention's softmax is uniform
and its output is the same vector for every query: ``to_out(to_v(token_c))``. The optional
precomputed export replaces each cross-attention by that per-class constant (a [K, C] table),
removing the 77-token attention from the engine.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
from pathlib import Path

import numpy as np

from cytoedge.runtime.errors import BundleError

log = logging.getLogger(__name__)

CONTEXT_TOKENS = 77
CONTEXT_DIM = 768


def _torch():
    import torch
    from torch import nn

    return torch, nn


def class_context(class_id, num_classes: int, tokens: int = CONTEXT_TOKENS, dim: int = CONTEXT_DIM):
    """``[B] int64 → [B, tokens, dim]``: one-hot rows padded to ``dim``, repeated over the tokens."""
    torch, _ = _torch()
    if num_classes > dim:
        raise ValueError(f"{num_classes} classes do not fit a {dim}-wide context token")
    table = torch.zeros(num_classes, dim)
    table[:, :num_classes] = torch.eye(num_classes)
    return table[class_id][:, None, :].expand(-1, tokens, -1)


def load_cytodiffusion(folder: Path):
    """``(unet, vae, scheduler_config)`` from a local diffusers folder; never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from diffusers import AutoencoderKL, UNet2DConditionModel
    except ImportError as e:
        raise BundleError(f"CytoDiffusion checkpoints need diffusers: pip install 'cytoedge[cytodiffusion]' ({e})") \
            from e
    folder = Path(folder)
    for part in ("unet", "vae", "scheduler"):
        if not (folder / part).is_dir():
            raise BundleError(f"{folder} is not a CytoDiffusion/diffusers checkpoint: folder '{part}/' is missing")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise BundleError(f"{sched_file} is missing")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", local_files_only=True).eval()
    return unet, vae, json.loads(sched_file.read_text())


def _module_classes():
    torch, nn = _torch()

    class CytoDiffusionDenoiser(nn.Module):
        """ε_θ(x_t, t, c) with the bundle's contract, building the 77×768 class context in the graph."""

        def __init__(self, unet, num_classes: int):
            super().__init__()
            self.unet = unet
            self.num_classes = num_classes

        def forward(self, x_t, timestep, class_id):
            ctx = class_context(class_id, self.num_classes, CONTEXT_TOKENS, self.unet.config.cross_attention_dim)
            return self.unet(x_t, timestep, encoder_hidden_states=ctx, return_dict=False)[0]

    class PrecomputedCrossAttention(nn.Module):
        """A cross-attention whose context tokens are identical: a per-class constant ``[K, C]``.

        Receives the one-hot class ``[B, 1, K]`` as ``encoder_hidden_states`` and returns
        ``onehot @ table`` broadcast over the query tokens.
        """

        def __init__(self, table):
            super().__init__()
            self.register_buffer("table", table)

        def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            return (encoder_hidden_states @ self.table).expand_as(hidden_states)

    class PrecomputedCytoDiffusionDenoiser(nn.Module):
        """The denoiser with every cross-attention replaced by its per-class constant."""

        def __init__(self, unet, num_classes: int):
            super().__init__()
            self.unet = copy.deepcopy(unet)
            self.num_classes = num_classes
            tokens = torch.zeros(num_classes, unet.config.cross_attention_dim)
            tokens[:, :num_classes] = torch.eye(num_classes)
            replaced = 0
            for name, block in self.unet.named_modules():
                attn = getattr(block, "attn2", None)
                if attn is None:
                    continue
                _check_plain_cross_attention(attn, name)
                with torch.no_grad():
                    table = attn.to_out[0](attn.to_v(tokens))
                block.attn2 = PrecomputedCrossAttention(table.detach())
                replaced += 1
            if replaced == 0:
                raise BundleError("the UNet has no cross-attention (attn2) to precompute")
            self.register_buffer("onehot", torch.eye(num_classes))
            log.info("precomputed %d cross-attention layers as per-class constants", replaced)

        def forward(self, x_t, timestep, class_id):
            onehot = self.onehot[class_id][:, None, :]
            return self.unet(x_t, timestep, encoder_hidden_states=onehot, return_dict=False)[0]

    class VaeEncoderMean(nn.Module):
        """RGB in [-1, 1] → scaled latent mean (the deterministic encoding classification uses)."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.scale = float(vae.config.scaling_factor)

        def forward(self, image):
            return self.vae.encode(image).latent_dist.mean * self.scale

    return CytoDiffusionDenoiser, PrecomputedCytoDiffusionDenoiser, VaeEncoderMean


def _check_plain_cross_attention(attn, name: str) -> None:
    """Refuse attention variants where the constant-output argument does not hold."""
    problems = []
    if getattr(attn, "residual_connection", False):
        problems.append("residual_connection")
    if getattr(attn, "rescale_output_factor", 1.0) != 1.0:
        problems.append("rescale_output_factor != 1")
    for part in ("norm_cross", "group_norm", "spatial_norm"):
        if getattr(attn, part, None) is not None:
            problems.append(part)
    if problems:
        raise BundleError(f"{name}: cross-attention uses {problems}; its output is not a per-class constant, "
                          "export without --precompute-cross-attention")


def cytodiffusion_denoiser(unet, num_classes: int, precompute_cross_attention: bool = False):
    full, precomputed, _ = _module_classes()
    cls = precomputed if precompute_cross_attention else full
    return cls(unet, num_classes).eval()


def vae_encoder_module(vae):
    return _module_classes()[2](vae).eval()


def latent_geometry(unet, vae, image_size: int) -> tuple[int, int]:
    """(latent channels, latent size) for ``image_size`` px inputs."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise BundleError(f"image size {image_size} px is not a multiple of the VAE's downscale factor {factor}")
    return int(unet.config.in_channels), image_size // factor


def schedule_from_diffusers(config: dict) -> dict:
    """The manifest ``noise_schedule`` block from a diffusers scheduler config."""
    kind = config.get("beta_schedule", "linear")
    if kind not in ("linear", "scaled_linear"):
        raise BundleError(f"scheduler beta_schedule {kind!r} is not supported (linear or scaled_linear)")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise BundleError(f"scheduler prediction_type {config.get('prediction_type')!r}: only 'epsilon' is supported")
    return {"kind": kind, "beta_start": float(config["beta_start"]), "beta_end": float(config["beta_end"]),
            "num_train_timesteps": int(config["num_train_timesteps"])}


def export_cytodiffusion_bundle(folder: Path, out: Path, class_names: list[str], abnormal_classes: list[str],
                                image_size: int, um_per_px: float, opset: int = 17,
                                precompute_cross_attention: bool = False, name: str | None = None,
                                batches: tuple[int, ...] | None = None) -> dict:
    """Export the UNet (as the denoiser) and the VAE encoder of ``folder`` into bundle ``out``.

    Returns the export report (max |ORT − PyTorch| per network), also stored in the manifest.
    """
    torch, _ = _torch()
    from cytoedge.export.make_bundle import git_commit
    from cytoedge.export.onnx_export import export_network
    from cytoedge.runtime.backends import engine_spec
    from cytoedge.runtime.bundle import FORMAT_VERSION, write_manifest

    unet, vae, sched = load_cytodiffusion(folder)
    k = len(class_names)
    channels, latent = latent_geometry(unet, vae, image_size)
    batches = batches or engine_spec.DEFAULT_PROFILE_BATCHES
    den_spec = engine_spec.denoiser_spec(latent, channels, batches)
    vae_spec = engine_spec.vae_encoder_spec(image_size, channels, latent, batches)
    denoiser = cytodiffusion_denoiser(unet, k, precompute_cross_attention)
    encoder = vae_encoder_module(vae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, latent, latent, generator=g)
    t, c = torch.tensor([10, 500]), torch.tensor([0, k - 1])
    export_network(denoiser, den_spec, (x, t, c), out / "denoiser.onnx", opset)
    image = torch.rand(1, 3, image_size, image_size, generator=g) * 2 - 1
    export_network(encoder, vae_spec, (image,), out / "vae_encoder.onnx", opset)
    report = {"denoiser_max_abs_error_vs_torch": onnx_vs_torch(denoiser, out / "denoiser.onnx", (x, t, c)),
              "vae_encoder_max_abs_error_vs_torch": onnx_vs_torch(encoder, out / "vae_encoder.onnx", (image,)),
              "precomputed_cross_attention": precompute_cross_attention, "opset": opset}
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name or f"cytodiffusion-{Path(folder).name}",
        "description": "CytoDiffusion latent denoiser (Stable Diffusion UNet, one-hot class context)",
        "class_names": list(class_names), "abnormal_classes": list(abnormal_classes),
        "input": {"size": image_size, "channels": 3, "channel_order": "RGB", "layout": "NCHW",
                  "um_per_px": um_per_px,
                  "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "note": "RGB [0,1] -> [-1,1]"}},
        "latent": {"channels": channels, "size": latent, "scaling_factor": float(vae.config.scaling_factor),
                   "encoder": "vae_encoder"},
        "noise_schedule": schedule_from_diffusers(sched),
        "prediction_type": "epsilon",
        "loss_mask": {"kind": "none"},
        "networks": {"denoiser": {"file": "denoiser.onnx", **den_spec.to_dict()},
                     "vae_encoder": {"file": "vae_encoder.onnx", **vae_spec.to_dict()}},
        "architecture": {"kind": "CytoDiffusionUNet2DCondition",
                         "conditioning": {"kind": "one-hot context", "tokens": CONTEXT_TOKENS,
                                          "dim": int(unet.config.cross_attention_dim),
                                          "cross_attention_precomputed": precompute_cross_attention}},
        "files": {"denoiser.onnx": {"sha256": "0" * 64}, "vae_encoder.onnx": {"sha256": "0" * 64}},
        "provenance": {"source": str(folder), "format": "diffusers (CytoDiffusion)", "export": report,
                       "date": dt.date.today().isoformat(), "code_commit": git_commit()},
    }
    write_manifest(out, manifest)
    log.info("CytoDiffusion bundle %s: %s", out, report)
    return report


def onnx_vs_torch(module, onnx_path: Path, inputs: tuple) -> float:
    """Largest |ONNX Runtime − PyTorch| on ``inputs`` (torch tensors, in the graph's input order)."""
    import onnxruntime as ort
    torch, _ = _torch()

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feed)[0]
    with torch.inference_mode():
        want = module(*inputs).numpy()
    return float(np.abs(got - want).max())
