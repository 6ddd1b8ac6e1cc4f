"""Arguments and helpers several commands share: model/backend selection, input expansion, progress."""
from __future__ import annotations

import argparse
from pathlib import Path

from cytoedge.runtime.cells import IMAGE_SUFFIXES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--backend", default="auto",
                   help="auto (TensorRT > ONNX Runtime CUDA > CPU) | tensorrt | onnxruntime-cuda | onnxruntime-cpu | "
                        "onnxruntime-cpu-int8 (after `cytoedge quantize`) | torch")
    p.add_argument("--estimator", choices=("fast", "reference"), default="fast",
                   help="fast: calibrated fixed-timestep estimator; reference: CytoDiffusion's protocol")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")


def add_guidance_argument(p: argparse.ArgumentParser) -> None:
    def scale(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value >= 1.0 and value != float("inf")):  # the sampler's rule (runtime.sampler.guidance_scale)
            raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 1 (1 = no guidance)")
        return value

    p.add_argument("--guidance", type=scale, default=None,
                   help="classifier-free guidance scale for drawing cells (default: the bundle's "
                        "sampling.guidance_scale; 1 = none)")


def add_stain_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stain-normalise", action="store_true",
                   help="match each crop's colours to the bundle's stain reference (Reinhard, fitted on the crop): "
                        "for crops of another lab's stain or scanner. On crops of the model's own stain it costs "
                        "accuracy (PBC: balanced accuracy 0.906 -> 0.819), so it is off by default")


def crop_stain_reference(args: argparse.Namespace, bundle):
    """The reference crops are normalised to under ``--stain-normalise``, else None."""
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.stain import reference_stats

    if not args.stain_normalise:
        return None
    reference = reference_stats(bundle)
    if reference is None:
        raise CytoedgeError(f"--stain-normalise: {bundle.path} has no stain_reference to normalise to")
    return reference


def load_bundle_and_backend(args: argparse.Namespace):
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle

    bundle = ModelBundle.load(args.model or default_bundle_path())
    return bundle, create_backend(bundle, args.backend, threads=args.threads), args.estimator


def expand_image_paths(inputs: list[Path]) -> tuple[list[Path], list[dict]]:
    """Files as given, folders expanded (recursively, sorted); missing inputs become error records."""
    paths, failures = [], []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                failures.append({"image": str(item), "error": f"{item}: folder holds no images {IMAGE_SUFFIXES}"})
            paths.extend(found)
        elif item.exists():
            paths.append(item)
        else:
            failures.append({"image": str(item), "error": f"{item}: no such file or folder"})
    return paths, failures


def progress_bar(total: int, unit: str, disable: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=disable, dynamic_ncols=True)
