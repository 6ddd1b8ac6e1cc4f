"""Train the bundled class-conditional DDPM denoiser on labelled crops (CPU, resumable).

    python -m cytoedge.training.train_denoiser --data ../shared/data/pbc/train --run runs/pbc32 --max-minutes 90

A config without ``classes`` trains PBC's white-cell classes; the red-cell model's config
(training/configs/rbc32.json, crops from training/rbc_data.py) names Chula's.

Objective: the usual ε-prediction MSE (Ho et al. 2020) on every sample, plus a small
discriminative term on a sub-batch: one shared noise, the masked denoising error under every class,
and cross-entropy of ``-error / temperature`` against the true class. That is exactly the score the
classifier reads at inference, so a small model spends its capacity where classification needs it
(the "diffusion classifier" trick of joint generative-discriminative training); generation still
comes from the MSE term. Checkpoints every ``--ckpt-every`` steps; rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from cytoedge.runtime.backends.torch_unet import ClassConditionalUNet, UNetConfig
from cytoedge.runtime.schedule import NoiseSchedule
from cytoedge.training.pbc_data import LEGACY_AUGMENT, STRONG_AUGMENT, CellSet, augment_batch, load_cell_set

log = logging.getLogger("cytoedge.training")

DEFAULT_DATA = Path("../shared/data/pbc/train")  # PBC training crops, where ../shared/data holds them
PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]

DEFAULTS = {
    "unet": UNetConfig(patch_size=2, base_channels=64, channel_mult=(1, 2, 2), blocks_per_level=1,
                       attention_levels=(1,)).to_dict(),
    "noise_schedule": {"kind": "linear", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 1000},
    # PBC crops here are ~180 px at ~2 source px per original px; the model sees the central
    # 96 px at 3 source px per model px (cache 60 px = 180 / 3, so zoom 1).
    "cache_size": 60,
    "zoom": 1.0,
    "mask_radius": 0.4,
    "batch_size": 64,
    "lr": 2e-4,
    "warmup_steps": 200,
    "ema_decay": 0.999,
    "disc_batch": 8,
    "disc_weight": 0.02,
    "disc_t_range": [50, 700],
    "class_balance_power": 0.5,
    "seed": 0,
    # Classes held out of training (the unseen-type anomaly experiment trains without one).
    "exclude_classes": [],
    # Fraction of MSE samples trained under an extra "null" class id (no class information), as in
    # classifier-free guidance: the unconditional prediction is the image-complexity baseline the
    # anomaly score compares the best class against (a likelihood ratio, not an absolute error).
    "null_class_prob": 0.1,
    # Augmentation strengths (training/pbc_data.py); a run config without this key used LEGACY_AUGMENT.
    "augment": STRONG_AUGMENT,
}


def trained_classes(cfg: dict) -> list[str]:
    """The classes a run is trained on, in the order of its ``classes`` (PBC's when the config has
    none: the white-cell runs), without the excluded ones."""
    classes = cfg.get("classes", PBC_CLASSES)
    unknown = sorted(set(cfg.get("exclude_classes", [])) - set(classes))
    if unknown:
        raise ValueError(f"exclude_classes {unknown} are not classes of this run {classes}")
    return [c for c in classes if c not in cfg.get("exclude_classes", [])]


def conditioning_ids(cfg: dict) -> int:
    """Rows of the class embedding: one per trained class, plus the null class when it is trained."""
    return len(trained_classes(cfg)) + (1 if cfg.get("null_class_prob", 0.0) > 0 else 0)


def disc_mask(size: int, radius: float) -> np.ndarray:
    """Centred disc of radius ``radius * size`` pixels: where the cell lies in a crop."""
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2.0
    return (((yy - c) ** 2 + (xx - c) ** 2) <= (radius * size) ** 2).astype(np.float32)


class Trainer:
    """``data``: the cells to train on, instead of those under ``data_root`` (a site fine-tune's)."""

    def __init__(self, cfg: dict, data_root: Path | None, run_dir: Path, cache_dir: Path, data: CellSet | None = None):
        self.cfg = cfg
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.classes = trained_classes(cfg)
        self.data = data if data is not None else load_cell_set(data_root, cache_dir, cfg["cache_size"], self.classes)
        counts = np.bincount(self.data.labels, minlength=len(self.classes)).astype(np.float64)
        w = counts[self.data.labels] ** (-cfg["class_balance_power"])
        self.sample_p = w / w.sum()
        self.null_class_prob = float(cfg.get("null_class_prob", 0.0))
        self.unet_cfg = UNetConfig.from_dict({**cfg["unet"], "num_classes": conditioning_ids(cfg)})
        self.model = ClassConditionalUNet(self.unet_cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        # The logit scale is one scalar: it gets a larger step so it tracks the shrinking errors.
        self.opt = torch.optim.AdamW([{"params": list(self.model.parameters()), "lr_mult": 1.0},
                                      {"params": [self.log_scale], "lr_mult": 50.0}], lr=cfg["lr"], weight_decay=0.0)
        sched = NoiseSchedule.from_config(cfg["noise_schedule"])
        self.alphas = torch.tensor(sched.alphas_cumprod, dtype=torch.float32)
        self.mask = torch.tensor(disc_mask(self.unet_cfg.image_size, cfg["mask_radius"]))
        self.step = 0
        self.elapsed = 0.0
        self.rng = np.random.default_rng(cfg["seed"])
        torch.manual_seed(cfg["seed"])

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / "ckpt.pt"

    def save(self) -> None:
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "log_scale": self.log_scale.detach(), "step": self.step, "elapsed": self.elapsed,
                 "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "cfg": self.cfg}
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt_path)

    def resume(self) -> bool:
        if not self.ckpt_path.exists():
            return False
        state = torch.load(self.ckpt_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            self.log_scale.copy_(state["log_scale"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d (%.1f min trained)", self.ckpt_path, self.step, self.elapsed / 60)
        return True

    def init_from_weights(self, path: Path, matching_only: bool = False) -> str:
        """Warm start from ``export_weights``' file (model and EMA both start from the EMA weights). With
        ``matching_only`` a wider network takes the tensors whose name and shape match and starts the rest
        fresh. Returns "k of n tensors"."""
        with np.load(path) as z:
            state = {k: torch.from_numpy(z[k].astype(np.float32)) for k in z.files if k != "__meta__"}
        own = self.model.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if matching_only and not fits:
            raise ValueError(f"{path}: no tensor matches this run's network by name and shape")
        if not matching_only and not len(fits) == len(state) == len(own):
            raise ValueError(f"{path}: {len(fits)} of its {len(state)} tensors fit this run's network of {len(own)}; "
                             f"a wider network starts from narrower weights with --init-matching")
        state = fits
        self.model.load_state_dict(state, strict=not matching_only)
        self.ema.load_state_dict(state, strict=not matching_only)
        loaded = f"{len(state)} of {len(own)} tensors"
        log.info("initialised from %s (%s)", path, loaded)
        return loaded

    def init_from_bundle(self, bundle_path: Path) -> None:
        """Warm start a new run from a bundle's exported weights (checkpoints are not kept across
        machines; the bundle is). A null-class row absent from the bundle starts at the class mean."""
        from cytoedge.runtime.backends.torch_backend import load_torch_denoiser
        from cytoedge.runtime.bundle import ModelBundle

        bundle = ModelBundle.load(bundle_path)
        if bundle.class_names != self.classes:
            raise ValueError(f"{bundle_path}: classes {bundle.class_names} differ from this run's {self.classes}")
        state = load_torch_denoiser(bundle).state_dict()
        rows = state["class_embed.weight"]
        if rows.shape[0] < self.unet_cfg.num_classes:
            state["class_embed.weight"] = torch.cat([rows, rows.mean(0, keepdim=True)])
        self.model.load_state_dict(state)
        self.ema.load_state_dict(state)
        log.info("initialised from %s (%s)", bundle_path, bundle.manifest.get("provenance", {}).get("steps"))

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.rng.choice(len(self.data.labels), size=n, p=self.sample_p)
        x = augment_batch(self.data.images[idx], self.unet_cfg.image_size, self.cfg["zoom"], self.rng,
                          self.cfg.get("augment", LEGACY_AUGMENT))
        x = torch.from_numpy(x).permute(0, 3, 1, 2) * 2.0 - 1.0
        return x.contiguous(), torch.from_numpy(self.data.labels[idx])

    def loss(self) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        x0, y = self.batch(cfg["batch_size"])
        t = torch.randint(0, len(self.alphas), (len(y),))
        noise = torch.randn_like(x0)
        if self.null_class_prob > 0:
            y = torch.where(torch.rand(len(y)) < self.null_class_prob, len(self.classes), y)
        a = self.alphas[t].view(-1, 1, 1, 1)
        mse = F.mse_loss(self.model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y), noise)
        stats = {"mse": mse.item()}
        total = mse
        if cfg["disc_weight"] > 0 and cfg["disc_batch"] > 0:
            k = len(self.classes)
            xd, yd = self.batch(cfg["disc_batch"])
            td = torch.randint(cfg["disc_t_range"][0], cfg["disc_t_range"][1], (len(yd),))
            nd = torch.randn_like(xd)
            ad = self.alphas[td].view(-1, 1, 1, 1)
            xt = (ad.sqrt() * xd + (1 - ad).sqrt() * nd).repeat_interleave(k, 0)
            classes = torch.arange(k).repeat(len(yd))
            eps = self.model(xt, td.repeat_interleave(k), classes)
            err = ((eps - nd.repeat_interleave(k, 0)) ** 2 * self.mask).sum((1, 2, 3)) / (self.mask.sum() * 3)
            logits = -err.view(len(yd), k) * self.log_scale.exp()
            ce = F.cross_entropy(logits, yd)
            total = total + cfg["disc_weight"] * ce
            stats.update(ce=ce.item(), disc_acc=(logits.argmax(1) == yd).float().mean().item(),
                         scale=self.log_scale.exp().item())
        return total, stats

    def train(self, max_steps: int, max_minutes: float, ckpt_every: int, log_every: int,
              on_step: Callable[[int], None] | None = None) -> None:
        self.model.train()
        log_file = (self.run_dir / "train_log.jsonl").open("a")
        t_start, elapsed0 = time.time(), self.elapsed
        window: list[dict] = []
        while self.step < max_steps and (time.time() - t_start) / 60 < max_minutes:
            lr = self.cfg["lr"] * min(1.0, (self.step + 1) / self.cfg["warmup_steps"])
            for group in self.opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            total, stats = self.loss()
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            decay = min(self.cfg["ema_decay"], (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            self.step += 1
            self.elapsed = elapsed0 + time.time() - t_start
            if on_step is not None:
                on_step(self.step)
            window.append(stats)
            if self.step % log_every == 0:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                record = {"step": self.step, "minutes": round(self.elapsed / 60, 2), "lr": lr, **mean}
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log.info("%s", record)
                window = []
            if self.step % ckpt_every == 0:
                self.save()
        self.save()
        log.info("stopped at step %d after %.1f min", self.step, self.elapsed / 60)


def export_weights(run_dir: Path, path: Path) -> int:
    """A run's EMA weights in FP16 (a third of a checkpoint's size) with its config and step, read from its
    checkpoint alone (not its data): what a fresh machine continues from (``--init-from`` this file); the
    optimiser state is not kept. Returns the step exported."""
    ckpt = run_dir / "ckpt.pt"
    if not ckpt.exists():
        raise SystemExit(f"{run_dir}: not a training run (no ckpt.pt); nothing to export weights from")
    state = torch.load(ckpt, weights_only=False)
    arrays = {k: v.detach().half().numpy() for k, v in state["ema"].items()}
    meta = {"cfg": state["cfg"], "step": state["step"], "train_minutes": round(state["elapsed"] / 60, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return int(state["step"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None,
                   help=f"labelled crops DIR/<class>/<image> (default: the run's own, else {DEFAULT_DATA})")
    p.add_argument("--run", type=Path, required=True, help="run folder: checkpoint, log, config")
    p.add_argument("--cache", type=Path, default=Path(".cache"))
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=60.0, help="wall-clock budget of this invocation")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", type=Path, action="append", default=[],
                   help="JSON overriding DEFAULTS (only for a new run); repeat it: later files override earlier keys")
    p.add_argument("--exclude-class", action="append", default=[], help="train without this class (new run only)")
    p.add_argument("--init-from", type=Path,
                   help="model bundle, or weights file from --export-weights, whose weights start a new run")
    p.add_argument("--init-matching", action="store_true",
                   help="with a weights file in --init-from: take only the tensors whose name and shape match this "
                        "run's network (a wider network from a narrower one's weights); the rest start fresh")
    p.add_argument("--export-weights", type=Path,
                   help="write the run's EMA weights (FP16 .npz, committable) from its checkpoint and stop")
    args = p.parse_args(argv)
    if args.init_matching and not (args.init_from and args.init_from.suffix == ".npz"):
        p.error("--init-matching needs --init-from with a weights file (.npz)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.export_weights:
        log.info("wrote %s (step %d)", args.export_weights, export_weights(args.run, args.export_weights))
        return
    cfg_path = args.run / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        # Resuming a run reads the data it was started on unless told otherwise.
        args.data = args.data or Path(cfg.get("data", DEFAULT_DATA))
    else:
        args.data = args.data or DEFAULT_DATA
        cfg = dict(DEFAULTS)
        for path in args.config:
            cfg.update(json.loads(path.read_text()))
        cfg["exclude_classes"] = sorted(set(cfg.get("exclude_classes", [])) | set(args.exclude_class))
        args.run.mkdir(parents=True, exist_ok=True)
        cfg["data"] = str(args.data)
        if args.init_from and args.init_from.suffix == ".npz":
            with np.load(args.init_from) as z:
                meta = json.loads(bytes(z["__meta__"]).decode())
            cfg["init_from"] = {"weights": str(args.init_from), "steps": meta["step"],
                                "train_minutes": meta["train_minutes"], "from_run": meta["cfg"].get("init_from")}
            if args.init_matching:
                cfg["init_from"]["matching_only"] = True
        elif args.init_from:
            prov = json.loads((args.init_from / "manifest.json").read_text()).get("provenance", {})
            cfg["init_from"] = {"bundle": str(args.init_from), "steps": prov.get("steps"),
                                "train_minutes": prov.get("train_minutes"), "code_commit": prov.get("code_commit")}
        cfg_path.write_text(json.dumps(cfg, indent=2))
    trainer = Trainer(cfg, args.data, args.run, args.cache)
    if not trainer.resume() and args.init_from:
        if args.init_from.suffix == ".npz":
            try:
                loaded = trainer.init_from_weights(args.init_from, args.init_matching)
            except ValueError as e:
                raise SystemExit(f"train_denoiser: {e}") from None
            if args.init_matching:
                cfg.setdefault("init_from", {})["loaded"] = loaded
                cfg_path.write_text(json.dumps(cfg, indent=2))
        else:
            trainer.init_from_bundle(args.init_from)
    trainer.train(args.max_steps, args.max_minutes, args.ckpt_every, args.log_every)


if __name__ == "__main__":
    main()
