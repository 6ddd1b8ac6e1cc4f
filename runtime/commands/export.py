"""``cytoedge export``: PyTorch denoiser → ONNX bundle (opset ≥ 17, dynamic batch), validated against PyTorch.

Sources: a cytoedge bundle (its UNet rebuilt in PyTorch from the graph's weights) or a
CytoDiffusion/diffusers checkpoint folder (``--cytodiffusion DIR``: unet/, vae/, scheduler/).
With ``--validate-data DIR`` the FP16 graph's decisions are compared with FP32 on labelled cells.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cytoedge.runtime.commands.common import add_um_per_px_argument


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a denoiser to ONNX (+ fused error graph, FP16) as a bundle",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="source bundle (default: the bundled model)")
    p.add_argument("--cytodiffusion", type=Path, default=None, help="diffusers folder to export instead of a bundle")
    p.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--no-fused", action="store_true", help="skip the fused (x0, noise, t, class, weight) → error graph")
    p.add_argument("--no-fp16", action="store_true", help="skip the FP16 copies")
    p.add_argument("--batches", default="1,8,64,256", help="batch sizes for the optimisation profiles")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--validate-data", type=Path, default=None, help="labelled cells DIR/<class>/*: FP16 vs FP32 decisions")
    p.add_argument("--per-class", type=int, default=5, help="cells per class for --validate-data")
    p.add_argument("--estimator", choices=("reference", "fast"), default="reference")
    p.add_argument("--trials", type=int, default=40, help="reference-estimator trials per cell (validation)")
    p.add_argument("--threads", type=int, default=None)
    g = p.add_argument_group("CytoDiffusion")
    g.add_argument("--class-names", default=None, help="comma-separated class names in one-hot order")
    g.add_argument("--abnormal-classes", default="", help="comma-separated")
    g.add_argument("--image-size", type=int, default=360)
    add_um_per_px_argument(g, "micrometres per input pixel (required)")
    g.add_argument("--precompute-cross-attention", action="store_true",
                   help="replace cross-attention by its per-class constant (identical context tokens)")
    p.set_defaults(func=run)


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def run(args: argparse.Namespace) -> int:
    from cytoedge.runtime.errors import CytoedgeError

    try:
        batches = tuple(int(b) for b in _csv(args.batches))
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise CytoedgeError(f"--batches {args.batches!r} must be comma-separated batch sizes of at least 1, e.g. 1,8,64")
    if args.validate_data is not None and not args.validate_data.is_dir():  # checked before the export, not after
        raise CytoedgeError(f"labelled data folder {args.validate_data} does not exist "
                            f"(expected {args.validate_data}/<class>/<image>)")
    if args.cytodiffusion:
        from cytoedge.export.cytodiffusion import export_cytodiffusion_bundle

        needed = [name for name, given in (("--class-names", args.class_names and _csv(args.class_names)),
                                           ("--um-per-px", args.um_per_px is not None)) if not given]
        if needed:
            raise CytoedgeError(f"--cytodiffusion needs {' and '.join(needed)}")
        report = export_cytodiffusion_bundle(args.cytodiffusion, args.out, _csv(args.class_names),
                                             _csv(args.abnormal_classes), args.image_size, args.um_per_px,
                                             args.opset, args.precompute_cross_attention, batches=batches)
        print(json.dumps(report, indent=2))
        return 0
    from cytoedge.export.export_bundle import export_bundle
    from cytoedge.models import default_bundle_path

    report = export_bundle(args.model or default_bundle_path(), args.out, args.opset, not args.no_fused,
                           not args.no_fp16, batches, args.overwrite)
    if args.validate_data:
        report.update(validate_decisions(args))
    print(json.dumps(report, indent=2))
    return 0


def validate_decisions(args: argparse.Namespace) -> dict:
    """Decisions on labelled cells: ONNX FP32 vs PyTorch, and FP16 vs FP32 where exported."""
    from cytoedge.export.validate import classifier_by_name, decision_agreement, load_labelled_cells
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.backends.torch_backend import TorchBackend
    from cytoedge.runtime.bundle import ModelBundle

    bundle = ModelBundle.load(args.out)
    batch, _ = load_labelled_cells(args.validate_data, bundle, args.per_class)
    classify = classifier_by_name(args.estimator, args.trials)
    settings = {"estimator": args.estimator, "trials": args.trials, "data": str(args.validate_data)}
    fp32 = OnnxRuntimeBackend(bundle, threads=args.threads)
    out = {"onnx_vs_torch_decisions": {**decision_agreement(batch, bundle, TorchBackend(bundle, threads=args.threads),
                                                            fp32, classify).to_dict(), **settings}}
    if not args.no_fp16:
        fp16 = OnnxRuntimeBackend(bundle, threads=args.threads, model_path=bundle.network_path("denoiser_fp16"))
        out["fp16_vs_fp32_decisions"] = {**decision_agreement(batch, bundle, fp32, fp16, classify).to_dict(),
                                         **settings}
    return out
