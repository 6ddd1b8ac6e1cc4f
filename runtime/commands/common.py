"""Arguments and helpers several commands share: model/backend selection, scoring options, input
expansion, progress. An option several commands take is defined here once, so it reaches them all."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from cytoedge.runtime.cells import IMAGE_SUFFIXES
from cytoedge.runtime.limits import MAX_FIELD_PIXELS, InputLimitError, check_um_per_px
from cytoedge.runtime.stain import METHODS


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--backend", default="auto",
                   help="auto (TensorRT > ONNX Runtime CUDA > CPU) | tensorrt | onnxruntime-cuda | onnxruntime-cpu | "
                        "onnxruntime-cpu-int8 (after `cytoedge quantize`) | torch | torch-cuda (PyTorch FP16 on a GPU; "
                        "with CuPy the probe loop stays on the GPU; not yet run on a GPU: benchmarks/gpu_check.sh)")
    p.add_argument("--estimator", choices=("fast", "reference"), default="fast",
                   help="fast: calibrated fixed-timestep estimator; reference: CytoDiffusion's protocol")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")


def add_labelled_data_arguments(p: argparse.ArgumentParser, every_class: bool) -> None:
    """``--data DIR`` or ``--reviews EXPORT...`` (calibrate, adapt): a lab's labelled cells, either way."""
    need = "every class of the bundle" if every_class else "any subset of classes"
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", type=Path, help=f"labelled folder DIR/<class>/<image> ({need})")
    data.add_argument("--reviews", type=Path, nargs="+", metavar="EXPORT",
                      help=f"review exports (review.html's corrections, docs/review-format.md): the cells readers "
                           f"confirmed or reclassified, cut again from their slides as `score` cuts them ({need})")


def add_red_cell_arguments(p: argparse.ArgumentParser) -> None:
    """score, demo and serve: the red-cell reading beside the white cells (runtime/red_cells.py)."""
    g = p.add_argument_group("red cells (ICSH morphology grading)")
    g.add_argument("--red-cell-model", type=Path, default=None,
                   help="red-cell bundle (default: the bundled one, when installed)")
    g.add_argument("--no-red-cells", action="store_true", help="do not read the red cells")
    g.add_argument("--red-cells-per-slide", type=bounded_int(100, 100_000), default=1000,
                   help="red cells sampled and classified per slide (ICSH grades on at least 1,000)")


def red_cell_stage(args: argparse.Namespace) -> tuple | None:
    """(red-cell bundle, its backend, sampling) for RedCellReader, or None when off or not installed."""
    from cytoedge.models import red_cell_bundle_path
    from cytoedge.runtime.backends.select import create_backend
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.red_cells import RedCellSampling

    path = None if args.no_red_cells else (args.red_cell_model or red_cell_bundle_path())
    if path is None:
        return None
    bundle = ModelBundle.load(path)
    return bundle, create_backend(bundle, args.backend, threads=args.threads), \
        RedCellSampling(target_cells=args.red_cells_per_slide)


def um_per_px(text: str) -> float:
    """argparse type of --um-per-px: a finite pixel size inside the supported range (runtime/limits.py)."""
    try:
        return check_um_per_px(text, "um_per_px")
    except InputLimitError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("um_per_px: ")) from None


def add_um_per_px_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str,
                           default: float | None = None) -> None:
    p.add_argument("--um-per-px", type=um_per_px, default=default, help=help_text)


CROP_SCALE_HELP = ("scale of the crops (default: estimated from their red cells, pooled over the crops of one "
                   "pixel size; the bundle's training-crop scale where nothing can be measured)")


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type: a whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}-{high}")
        return value

    return parse


def add_scoring_arguments(p: argparse.ArgumentParser, scale: bool = True) -> None:
    """The ScoringOptions flags of score, demo and serve (see ``scoring_options``). ``scale=False``
    (serve): no --um-per-px, as each job's scale comes with its SUBMIT."""
    g = p.add_argument_group("scoring")
    if scale:
        add_um_per_px_argument(g, "pixel size of the input (default: DICOM pixel spacing, else estimated from "
                                  "red cells)")
    else:
        p.set_defaults(um_per_px=None)
    g.add_argument("--no-stain-normalisation", action="store_true", help="use the colours as scanned")
    add_stain_method_argument(g, "match the colours to the bundle's stain reference with METHOD (default: reinhard)")
    g.add_argument("--stain-context", choices=("slide", "cell"), default="slide",
                   help="fit the stain map once per slide (default) or on a 36-µm field around each cell")
    g.add_argument("--no-heatmaps", action="store_true", help="skip counterfactual heatmaps of flagged cells")
    g.add_argument("--heatmaps-for", choices=("flagged", "all"), default="flagged",
                   help="cells given a heatmap (up to --max-heatmaps a slide); each costs 2 denoiser calls a probe")
    g.add_argument("--max-heatmaps", type=bounded_int(0, 100000), default=64, help="heatmaps per slide at most")
    # A tile is read whole, like a field image, so its core is bounded as a field is (below 64 px, cores only
    # multiply tiles).
    g.add_argument("--tile-px", type=bounded_int(64, math.isqrt(MAX_FIELD_PIXELS)), default=2048,
                   help="tile core size in source pixels (shrunk where the model's scale would make it too large)")
    g.add_argument("--batch-cells", type=bounded_int(1, 65536), default=256, help="cells per classification batch")


def scoring_options(args: argparse.Namespace):
    """The ScoringOptions of the flags ``add_scoring_arguments`` defined."""
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.slide_scoring import ScoringOptions

    if args.no_stain_normalisation and args.stain_method:
        raise CytoedgeError(f"--stain-method {args.stain_method} and --no-stain-normalisation: choose one")
    return ScoringOptions(um_per_px=args.um_per_px, stain_normalise=not args.no_stain_normalisation,
                          stain_context=args.stain_context, stain_method=args.stain_method or "reinhard",
                          heatmaps=not args.no_heatmaps, tile_px=args.tile_px,
                          batch_cells=args.batch_cells, heatmap_cells=args.heatmaps_for,
                          max_heatmaps=args.max_heatmaps)


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


def add_stain_method_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str) -> None:
    p.add_argument("--stain-method", choices=METHODS, default=None, metavar="METHOD",
                   help=f"{help_text}; METHOD: {', '.join(METHODS)}")


def add_stain_argument(p: argparse.ArgumentParser) -> None:
    """``--stain-normalise`` and ``--stain-method`` of the crop commands (classify, evaluate)."""
    p.add_argument("--stain-normalise", action="store_true",
                   help="match each crop's colours to the bundle's stain reference (fitted on the crop; Reinhard "
                        "unless --stain-method): for crops of another lab's stain or scanner. On crops of the model's "
                        "own stain it costs accuracy (PBC: balanced accuracy 0.906 -> 0.819), so it is off by default")
    add_stain_method_argument(p, "normalise each crop with METHOD (implies --stain-normalise)")


def crop_stain_normaliser(args: argparse.Namespace, bundle):
    """The StainNormaliser each crop is matched with under ``--stain-normalise`` / ``--stain-method``, else None."""
    from cytoedge.runtime.errors import CytoedgeError
    from cytoedge.runtime.stain import stain_normaliser

    if not (args.stain_normalise or args.stain_method):
        return None
    normaliser = stain_normaliser(bundle, args.stain_method or "reinhard")
    if normaliser is None:
        raise CytoedgeError(f"--stain-normalise: {bundle.path} has no stain_reference to normalise to")
    return normaliser


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


def add_run_log_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """``--run-log PATH`` / ``--no-run-log`` (score, serve, compare): where ``what`` is recorded."""
    g = p.add_argument_group("run log (read by `cytoedge monitor`)")
    g.add_argument("--run-log", type=Path, default=None, metavar="PATH",
                   help=f"record {what} here (default: $CYTOEDGE_RUN_LOG, else ~/.local/share/cytoedge/runlog.sqlite)")
    g.add_argument("--no-run-log", action="store_true", help="do not write the run log")
