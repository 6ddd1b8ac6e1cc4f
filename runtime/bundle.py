"""Model bundle: a folder with ``manifest.json``, the denoiser ONNX graph(s) and calibration.

Everything a run depends on (class names, input scale, noise schedule, loss mask, calibrated
numbers) is read from here, never from literals in code, and every file is checked against the
sha256 the manifest records, so a result can always be traced to the exact model that made it.
Validation is closed: a missing or mistyped field is refused with its name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from functools import lru_cache
from typing import Any

import numpy as np

from cytoedge.kernels import ColourTransform

from cytoedge.runtime.calibration_config import Calibration
from cytoedge.runtime.errors import BundleError, CalibrationError
from cytoedge.runtime.json_schema import describe_error, packaged_validator
from cytoedge.runtime.schedule import NoiseSchedule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "schemas/manifest.schema.json"
# How a crop's pixel scale may be estimated when its file does not declare one (runtime/crop_scale.py);
# a bundle lists the ones it allows in ``input.crop_scale.estimate_from`` (absent: all). A red-cell
# bundle allows none: the size of the cell it reads is a class feature, so it cannot also set the scale.
CROP_SCALE_ESTIMATORS = ("red-cells", "white-cell")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=None)
def _manifest_validator():
    return packaged_validator("cytoedge.runtime", MANIFEST_SCHEMA)


def validate_manifest(manifest: Any, where: str) -> None:
    """Raise BundleError naming ``where`` and the first field that is missing or has the wrong form: the
    JSON Schema (runtime/schemas/manifest.schema.json) first, then what spans several fields."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest must be a JSON object")
    validator = _manifest_validator()
    error = next(iter(validator.iter_errors(manifest)), None)
    if error is not None:
        raise BundleError(f"{where}: {describe_error(error, manifest, validator.schema, 'manifest')}")
    unknown = sorted(set(manifest["abnormal_classes"]) - set(manifest["class_names"]))
    if unknown:
        raise BundleError(f"{where}: abnormal_classes {unknown} are not in class_names {manifest['class_names']}")
    null_id = manifest.get("null_class_id")
    if null_id is not None and null_id != len(manifest["class_names"]):
        raise BundleError(f"{where}: field 'null_class_id' is {null_id!r}; it must be {len(manifest['class_names'])} "
                          "(the id after the last class) or absent")
    if manifest["loss_mask"]["kind"] == "disc" and "radius" not in manifest["loss_mask"]:
        raise BundleError(f"{where}: field 'loss_mask.radius' is missing; a disc mask needs it (a fraction of the "
                          "input size in (0, 0.5])")
    scale = (manifest.get("sampling") or {}).get("guidance_scale", 1)
    if scale != 1 and null_id is None:
        raise BundleError(f"{where}: field 'sampling.guidance_scale' is {scale}, but classifier-free guidance "
                          "needs a null class and 'null_class_id' is absent")
    for key in ("calibration", "domain", "grading"):
        if key in manifest and manifest[key] not in manifest["files"]:
            raise BundleError(f"{where}: field '{key}' names {manifest[key]!r}, which 'files' does not list")


def _read_grading(gpath: Path, class_names: list[str]) -> dict:
    """A red-cell bundle's grading table, checked field by field (runtime/rbc_grading.check_grading)."""
    from cytoedge.runtime.rbc_grading import check_grading

    try:
        doc = json.loads(gpath.read_text())
        check_grading(doc, class_names)
    except (json.JSONDecodeError, ValueError) as e:
        raise BundleError(f"{gpath}: {e}") from None
    return doc


@dataclass(frozen=True)
class ModelBundle:
    """A validated, hash-checked model bundle."""

    path: Path
    manifest: dict
    sha256: str
    schedule: NoiseSchedule
    calibration: Calibration | None  # calibration.json, checked and typed at load
    domain: dict | None = None  # the out-of-domain alarm's reference (runtime/domain_alarm.py), if fitted
    grading: dict | None = None  # a red-cell bundle's ICSH grading table (calibration/icsh_grading.py)

    @classmethod
    def load(cls, path: str | Path) -> "ModelBundle":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{path} is not a model bundle: {MANIFEST} not found")
        raw = mpath.read_bytes()
        try:
            manifest = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        validate_manifest(manifest, str(mpath))
        referenced = [manifest["networks"]["denoiser"]["file"]]
        referenced += [net["file"] for name, net in manifest["networks"].items() if name != "denoiser"]
        for key in ("calibration", "domain", "grading"):
            if manifest.get(key):
                referenced.append(manifest[key])
        for name in referenced:
            if name not in manifest["files"]:
                raise BundleError(f"{mpath}: '{name}' is used by the manifest but has no entry in 'files'")
        for name, entry in manifest["files"].items():
            fpath = path / name
            if not fpath.is_file():
                raise BundleError(f"{path}: file '{name}' listed in the manifest is missing")
            actual = sha256_file(fpath)
            if actual != entry["sha256"]:
                raise BundleError(
                    f"{fpath}: sha256 {actual[:12]}… does not match the manifest ({entry['sha256'][:12]}…); "
                    "the file was changed or corrupted — restore it or rebuild the bundle"
                )
        schedule = NoiseSchedule.from_config(manifest["noise_schedule"])
        calibration = None
        if manifest.get("calibration"):
            cpath = path / manifest["calibration"]
            try:
                doc = json.loads(cpath.read_text())
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{cpath}: not valid JSON ({e})") from None
            calibration = Calibration.from_dict(doc, len(manifest["class_names"]), schedule.num_train_timesteps,
                                                str(cpath))
        domain = json.loads((path / manifest["domain"]).read_text()) if manifest.get("domain") else None
        grading = _read_grading(path / manifest["grading"], manifest["class_names"]) if manifest.get("grading") else None
        return cls(path, manifest, hashlib.sha256(raw).hexdigest(), schedule, calibration, domain, grading)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def null_class_id(self) -> int | None:
        """The class id of the unconditional ("no class") prediction, if the network was trained with one."""
        null_id = self.manifest.get("null_class_id")
        return None if null_id is None else int(null_id)

    @property
    def num_class_ids(self) -> int:
        """Class ids the denoiser accepts: the classes, plus the null class where there is one."""
        return len(self.class_names) + (self.null_class_id is not None)

    @property
    def guidance_scale(self) -> float:
        """Classifier-free guidance for drawing cells (``sampling.guidance_scale``; 1 = none)."""
        return float((self.manifest.get("sampling") or {}).get("guidance_scale", 1.0))

    @property
    def cell_type(self) -> str:
        """The kind of cell the bundle reads: "white" (with a nucleus) or "red". It decides how a crop is
        checked for holding a cell at all (a red cell has no nucleus to find; runtime/detection.holds_a_cell)."""
        return str(self.manifest.get("cell_type", "white"))

    @property
    def is_latent(self) -> bool:
        """Whether the denoiser works on a VAE latent (an encoder network turns pixels into it) rather than
        on the pixels themselves."""
        return bool(self.manifest.get("latent"))

    @property
    def encoder_network(self) -> str | None:
        """The name of a latent bundle's encoder network (None for a pixel bundle)."""
        latent = self.manifest.get("latent")
        return latent.get("encoder", "vae_encoder") if latent else None

    @property
    def crop_um_per_px(self) -> float:
        """Micrometres per pixel of the training crops (``input.source_px_per_model_px`` of them per model pixel):
        the scale a crop with no other clue is assumed to have."""
        return self.um_per_px / float(self.manifest["input"].get("source_px_per_model_px", 1.0))

    @property
    def crop_scale_reference(self) -> dict:
        """What calibration/crop_scale.py measured on the training crops (``input.crop_scale``; empty if never)."""
        return dict(self.manifest["input"].get("crop_scale") or {})

    @property
    def stain_reference(self) -> dict | None:
        """The stain targets the slides' colours are mapped to (``stain_reference``), or None."""
        ref = self.manifest.get("stain_reference")
        return dict(ref) if ref else None

    def file_sha256(self, name: str) -> str:
        """The sha256 the manifest records for the bundle file ``name`` (checked against the file at load)."""
        return self.manifest["files"][name]["sha256"]

    @property
    def crop_scale_estimators(self) -> list[str]:
        """How a crop without a declared scale may have it estimated (CROP_SCALE_ESTIMATORS, in order)."""
        return list(self.crop_scale_reference.get("estimate_from", CROP_SCALE_ESTIMATORS))

    @property
    def abnormal_classes(self) -> list[str]:
        return list(self.manifest["abnormal_classes"])

    @property
    def input_size(self) -> int:
        return int(self.manifest["input"]["size"])

    @property
    def denoiser_shape(self) -> tuple[int, int]:
        """(channels, size) of the denoiser's ``x_t``: the latent's for a latent-diffusion bundle,
        else the RGB model input's."""
        latent = self.manifest.get("latent")
        return (int(latent["channels"]), int(latent["size"])) if latent else (3, self.input_size)

    @property
    def um_per_px(self) -> float:
        """Micrometres per model pixel: the scale every image is resampled to."""
        return float(self.manifest["input"]["um_per_px"])

    @property
    def denoiser_path(self) -> Path:
        return self.path / self.manifest["networks"]["denoiser"]["file"]

    def network_path(self, name: str) -> Path | None:
        net = self.manifest["networks"].get(name)
        return self.path / net["file"] if net else None

    def loss_mask(self) -> np.ndarray:
        """The ``[H, W]`` float32 weight map the classifier's denoising error is averaged over."""
        size, spec = self.denoiser_shape[1], self.manifest["loss_mask"]
        if spec["kind"] == "none":
            return np.ones((size, size), np.float32)
        yy, xx = np.mgrid[:size, :size]
        c = (size - 1) / 2.0
        return (((yy - c) ** 2 + (xx - c) ** 2) <= (spec["radius"] * size) ** 2).astype(np.float32)

    def colour_transform(self) -> ColourTransform:
        """How the kernels turn a cell's RGB into this model's inputs: the manifest's normalisation (every
        cut of a cell for this model goes through it, so a bundle with another range just works)."""
        norm = self.manifest["input"]["normalisation"]
        return ColourTransform(mean=tuple(float(v) for v in norm["mean"]), std=tuple(float(v) for v in norm["std"]))


def write_manifest(path: Path, manifest: dict, staged: dict[str, Path] | None = None) -> None:
    """Recompute every listed file's sha256, validate, and write ``manifest.json``.

    ``staged`` maps bundle file names to finished temporary files in the same folder (written there so
    that a failed run never leaves a half-written file under the real name): they are hashed in place of
    the current files and moved over them together with the new manifest, at the end. Everything that can
    fail (hashing, validation, writing the new manifest) happens before anything is replaced; each file
    and the manifest are moved with ``os.replace``, and if a move fails the files already moved are put
    back, so the bundle keeps an old graph with the old manifest or the new graph with the new one.
    """
    path = Path(path)
    staged = {name: Path(tmp) for name, tmp in (staged or {}).items()}
    unknown = sorted(set(staged) - set(manifest["files"]))
    if unknown:
        raise BundleError(f"{path}: staged file(s) {unknown} are not listed in the manifest's 'files'")
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_file(staged.get(name, path / name))}
    validate_manifest(manifest, str(path / MANIFEST))
    tmp_manifest, backups = path / f".{MANIFEST}.{os.getpid()}.tmp", {}
    try:
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        for name, tmp in [(MANIFEST, tmp_manifest), *staged.items()]:
            if (path / name).exists():  # keep the replaced file's permissions, as writing over it did
                shutil.copymode(path / name, tmp)
        for name in staged:
            if (path / name).exists():  # a second name for the old file, to put back if a later move fails
                backups[name] = path / f".{name}.{os.getpid()}.old"
                backups[name].unlink(missing_ok=True)
                try:
                    os.link(path / name, backups[name])
                except OSError:
                    shutil.copy2(path / name, backups[name])
        moved = []
        try:
            for name, tmp in staged.items():
                os.replace(tmp, path / name)
                moved.append(name)
            os.replace(tmp_manifest, path / MANIFEST)
        except BaseException:
            for name in moved:
                if name in backups:
                    os.replace(backups[name], path / name)
                else:
                    (path / name).unlink(missing_ok=True)
            raise
    finally:
        tmp_manifest.unlink(missing_ok=True)
        for backup in backups.values():
            backup.unlink(missing_ok=True)
