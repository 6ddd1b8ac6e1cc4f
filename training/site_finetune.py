"""Fine-tune a bundle's denoiser on a lab's few labelled cells (``cytoedge adapt --method finetune``).

The bundle's own trainer (train_denoiser.Trainer) runs on the site's cells instead of PBC's: the
ε-prediction loss under each cell's class (and the null class on a share of samples, so the anomaly
score's baseline moves with the site), plus the discriminative term the classifier reads. Few cells,
so: a small learning rate, a short EMA, balanced classes, rotation/flip/scale augmentation and only
mild colour jitter (the site's own colours are what the network is to learn). The cells come as
model-scale windows around each cell, cut from the same CellBatches the estimator reads.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from cytoedge.runtime.cells import CellBatch

WINDOW = 60  # model pixels around each cell: the training cache's size (rotation margin for a 32-px input)

FINETUNE_SETTINGS = {
    "batch_size": 32,
    "lr": 5e-5,
    "warmup_steps": 20,
    "ema_decay": 0.98,
    "disc_batch": 8,
    "disc_weight": 0.1,
    "disc_t_range": [50, 700],
    "class_balance_power": 1.0,
    "null_class_prob": 0.1,
    "augment": {"scale_jitter": 0.1, "shift_px": 1.0, "colour_jitter": 0.05, "hed_jitter": 0.02,
                "blur_prob": 0.1, "blur_sigma": [0.3, 0.8], "jpeg_prob": 0.1, "jpeg_quality": [60, 95]},
}


def cell_windows(batches: list[CellBatch], size: int = WINDOW) -> np.ndarray:
    """``[N, size, size, 3] uint8``: each cell's model-scale surroundings, reflected where the tile ends."""
    import cv2

    out = []
    for batch in batches:
        for tile_index, cx, cy, *_ in batch.cells:
            tile = batch.tiles[int(tile_index)]
            x0, y0 = int(round(cx - (size - 1) / 2)), int(round(cy - (size - 1) / 2))
            h, w = tile.shape[:2]
            pad = [max(0, -y0), max(0, y0 + size - h), max(0, -x0), max(0, x0 + size - w)]
            padded = cv2.copyMakeBorder(tile, *pad, cv2.BORDER_REFLECT_101) if any(pad) else tile
            out.append(padded[y0 + pad[0]:y0 + pad[0] + size, x0 + pad[2]:x0 + pad[2] + size])
    return np.stack(out)


def finetune_config(bundle, seed: int) -> dict:
    """The trainer's config for this bundle: its architecture, schedule and mask, FINETUNE_SETTINGS."""
    arch = {k: v for k, v in bundle.manifest["architecture"]["config"].items() if k != "num_classes"}
    return {"unet": arch, "noise_schedule": bundle.manifest["noise_schedule"], "cache_size": WINDOW, "zoom": 1.0,
            "mask_radius": bundle.manifest["loss_mask"].get("radius", 0.4), "seed": seed,
            "exclude_classes": list(bundle.manifest.get("excluded_classes", [])), **FINETUNE_SETTINGS}


def finetune_denoiser(bundle, windows: np.ndarray, labels: np.ndarray, max_steps: int, max_minutes: float,
                      seed: int, on_step: Callable[[int], None] | None = None):
    """The bundle's network fine-tuned on ``windows`` (class ids ``labels``); returns (EMA model, steps, minutes)."""
    from cytoedge.training.pbc_data import CellSet
    from cytoedge.training.train_denoiser import Trainer

    cfg = finetune_config(bundle, seed)
    data = CellSet(windows, labels.astype(np.int64), list(bundle.class_names), [])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, None, Path(run_dir), Path(run_dir), data=data)
        trainer.init_from_bundle(bundle.path)
        trainer.train(max_steps, max_minutes, ckpt_every=max_steps + 1, log_every=max(1, max_steps // 10),
                      on_step=on_step)
    return trainer.ema.eval(), trainer.step, trainer.elapsed / 60
