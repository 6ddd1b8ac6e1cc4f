"""CytoDiffusion-format checkpoints: a tiny randomly initialised diffusers model built here, saved as a
diffusers folder, loaded offline and exported into a bundle (45×45 latent: not a multiple of 8)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from cytoedge.export.cytodiffusion import (class_context, cytodiffusion_denoiser,  # noqa: E402
                                           export_cytodiffusion_bundle, load_cytodiffusion)
from cytoedge.runtime.bundle import ModelBundle  # noqa: E402
from cytoedge.runtime.errors import BundleError  # noqa: E402

CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
IMAGE = 360  # CytoDiffusion's input: 360 px → 45 × 45 latent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SD-1.5-shaped diffusers folder (unet/, vae/, scheduler/) with random weights."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cytodiffusion")
    unet = diffusers.UNet2DConditionModel(
        sample_size=45, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=8)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the output layer clearly non-zero
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 8, 8, 8),
                                  layers_per_block=1, sample_size=IMAGE)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    sched.save_pretrained(root / "scheduler")
    return root


def test_class_context_is_one_hot_rows_padded_and_repeated():
    ctx = class_context(torch.tensor([2, 0]), 8)
    assert ctx.shape == (2, 77, 768)
    assert torch.equal(ctx[0, 5, :8], torch.eye(8)[2]) and float(ctx[0, :, 8:].abs().sum()) == 0.0
    assert torch.equal(ctx[1], ctx[1, :1].expand(77, -1))


def test_precomputed_cross_attention_matches_full_model(checkpoint):
    unet, _, _ = load_cytodiffusion(checkpoint)
    full = cytodiffusion_denoiser(unet, len(CLASSES))
    fast = cytodiffusion_denoiser(unet, len(CLASSES), precompute_cross_attention=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 45, 45, generator=g)
    t, c = torch.tensor([1, 250, 600, 999]), torch.tensor([0, 3, 5, 7])
    with torch.inference_mode():
        want, got = full(x, t, c), fast(x, t, c)
        other = full(x, t, torch.tensor([1, 2, 6, 0]))
    assert want.shape == (4, 4, 45, 45)
    assert float((want - other).abs().max()) > 1e-3  # the class changes the output, so the check below can fail
    assert float((want - got).abs().max()) < 1e-4


def test_export_bundle_runs_in_onnxruntime_like_pytorch(checkpoint, tmp_path):
    report = export_cytodiffusion_bundle(checkpoint, tmp_path / "bundle", CLASSES, ["erythroblast", "ig"],
                                         IMAGE, um_per_px=0.1, precompute_cross_attention=True, batches=(1, 8))
    assert report["denoiser_max_abs_error_vs_torch"] < 1e-3
    assert report["vae_encoder_max_abs_error_vs_torch"] < 1e-3
    bundle = ModelBundle.load(tmp_path / "bundle")
    assert bundle.manifest["latent"]["size"] == 45 and bundle.manifest["latent"]["channels"] == 4
    assert bundle.schedule.num_train_timesteps == 1000
    import onnxruntime as ort

    den = ort.InferenceSession(str(bundle.denoiser_path), providers=["CPUExecutionProvider"])
    enc = ort.InferenceSession(str(bundle.network_path("vae_encoder")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (3, 3, IMAGE, IMAGE)).astype(np.float32)  # batch 3: not the export batch
    latent = enc.run(None, {"image": image})[0]
    assert latent.shape == (3, 4, 45, 45)
    eps = den.run(None, {"x_t": latent, "timestep": np.array([5, 400, 900]), "class_id": np.array([0, 4, 7])})[0]
    assert eps.shape == (3, 4, 45, 45) and np.all(np.isfinite(eps))
    spec = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["networks"]["denoiser"]
    assert spec["profiles"] == [{"min": 1, "opt": 1, "max": 1}, {"min": 2, "opt": 8, "max": 8}]


def test_missing_vae_folder_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(BundleError, match="vae/"):
        load_cytodiffusion(tmp_path)


def test_latent_bundle_scores_cells_with_both_estimators(checkpoint, tmp_path):
    """The estimators run on a latent bundle: crops → VAE latents → noised → UNet, never knowing it."""
    from cytoedge.calibration.artefact import candidate_probes, write_calibration
    from cytoedge.calibration.fit import fit_calibration
    from cytoedge.kernels import cell_table
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.cells import CellBatch
    from cytoedge.runtime.classify_cells import classify_batch
    from cytoedge.runtime.estimator import DenoiserErrorSource, noise_bank
    from cytoedge.runtime.probe_errors import all_class_errors
    from cytoedge.runtime.reference_estimator import ReferenceSettings
    from cytoedge.runtime.sampler import ddim_sample

    export_cytodiffusion_bundle(checkpoint, tmp_path / "bundle", CLASSES, ["erythroblast", "ig"], IMAGE,
                                um_per_px=0.1, batches=(1, 16))
    bundle = ModelBundle.load(tmp_path / "bundle")
    assert bundle.denoiser_shape == (4, 45) and bundle.loss_mask().shape == (45, 45)
    rng = np.random.default_rng(3)
    n = 2 * len(CLASSES)
    tiles = [rng.integers(0, 256, (IMAGE + 20, IMAGE + 20, 3), dtype=np.uint8) for _ in range(n)]
    centre = (IMAGE + 19) / 2
    batch = CellBatch(tiles, cell_table(np.arange(n), np.full(n, centre), np.full(n, centre)))
    backend = OnnxRuntimeBackend(bundle, threads=2, max_batch=8)  # 45×45 self-attention: keep batches small
    probes = candidate_probes([100, 500], 1)
    noise = noise_bank(bundle, len(probes), 11)
    assert noise.shape == (2, 4, 45, 45)
    source = DenoiserErrorSource(batch, bundle, backend, probes, noise)
    assert source.x0.shape == (1, n, 4, 45, 45)  # encoded once per view
    from cytoedge.runtime.encoders import VaeLatentSpace, create_encoder

    assert isinstance(create_encoder(bundle), VaeLatentSpace) and create_encoder(bundle) is create_encoder(bundle)
    E = all_class_errors(batch, bundle, backend, probes, noise)
    assert E.shape == (n, len(CLASSES), 2) and np.all(np.isfinite(E)) and np.all(E > 0)
    labels = np.repeat(np.arange(len(CLASSES)), 2)
    write_calibration(bundle, fit_calibration(E, labels, CLASSES, bundle.abnormal_classes, {"max_probes": 2}),
                      probes, 11, {"data": "random tiles (test)"})
    bundle = ModelBundle.load(tmp_path / "bundle")
    fast = classify_batch(batch, bundle, backend)
    assert fast == classify_batch(batch, bundle, backend)  # deterministic
    assert all(r["class"] in CLASSES and 0 < r["nfe"] <= 2 * len(CLASSES) for r in fast)
    ref = classify_batch(CellBatch(tiles[:2], batch.cells[:2]), bundle, backend, "reference",
                         ReferenceSettings(n_trials=10, first_test=5))
    assert all(r["class"] in CLASSES and r["nfe"] > 0 for r in ref)
    with pytest.raises(BundleError, match="not draw them"):
        ddim_sample(bundle, backend, np.array([0]), steps=2)

    # INT8 selection works on the diffusers UNet graph too: MACs through its up-samplers, latents as inputs.
    from cytoedge.export.int8_selection import select_and_quantize
    from cytoedge.export.quantize import conv_macs
    from cytoedge.kernels import prepare_batch

    x0 = create_encoder(bundle).encode(prepare_batch(batch.tiles, batch.cells, bundle.input_size)[0])
    feed = {"x_t": x0[:1], "timestep": np.array([10]), "class_id": np.array([0])}
    convs = list(conv_macs(bundle.denoiser_path, feed))
    report = select_and_quantize(bundle, x0, x0, tmp_path / "int8.onnx",
                                 {"max_score_shift": 1e9, "score_cells": 2, "calibration_batches": 2,
                                  "calibration_batch": 4}, threads=2, candidates=convs[1:3])
    assert sorted(report["score_shift_per_conv"]) == sorted(convs[1:3]) and len(report["fp32_convs"]) == len(convs) - 2
    int8 = OnnxRuntimeBackend(bundle, threads=2, max_batch=8, model_path=tmp_path / "int8.onnx")
    eps = int8.predict_noise(x0[:2], np.array([10, 500]), np.array([0, 1]))
    assert eps.shape == x0[:2].shape and np.all(np.isfinite(eps))
