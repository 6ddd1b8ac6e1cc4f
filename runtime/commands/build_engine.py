"""``cytoedge build-engine``: the bundle's ONNX denoiser → FP16 TensorRT engine for this GPU.

Builds one optimisation profile per batch size the estimator uses, at the chosen builder
optimisation level, reusing a timing cache file; writes the engine and its sidecar (ONNX sha256,
TensorRT version, GPU, compute capability, profiles) to the engine cache. Needs an NVIDIA GPU with
tensorrt and pycuda (``pip install 'cytoedge[gpu]'``).
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-engine", help="build the FP16 TensorRT engine for this GPU", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="bundle folder (default: the bundled model)")
    p.add_argument("--network", default=None,
                   help="bundle network to build (default: denoiser_fp16 where exported, else denoiser)")
    p.add_argument("--batches", default="1,8,64,256", help="batch sizes → one profile each")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0..5")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (read and updated)")
    p.add_argument("--cache-dir", type=Path, default=None, help="engine cache (default $CYTOEDGE_ENGINE_CACHE "
                   "or ~/.cache/cytoedge/engines)")
    p.add_argument("--workspace-mib", type=int, default=4096)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine is cached")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.export.tensorrt_engine import build_engine
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends import engine_spec
    from cytoedge.runtime.backends.engine_cache import tensorrt_source
    from cytoedge.runtime.backends.select import tensorrt_availability
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.errors import BackendError, BundleError, CytoedgeError

    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1:
        raise CytoedgeError(f"--batches {args.batches!r} must be comma-separated batch sizes of at least 1, e.g. 1,8,64")
    if not 0 <= args.opt_level <= 5:
        raise CytoedgeError(f"--opt-level must be 0..5 (TensorRT builder optimisation level), got {args.opt_level}")
    if args.workspace_mib < 1:
        raise CytoedgeError(f"--workspace-mib must be at least 1, got {args.workspace_mib}")
    bundle = ModelBundle.load(args.model or default_bundle_path())
    status = tensorrt_availability(None)
    if not status.available:
        raise BackendError(f"cannot build a TensorRT engine here: {status.reason}")
    onnx_path = bundle.network_path(args.network) if args.network else tensorrt_source(bundle)
    if onnx_path is None:
        raise BundleError(f"bundle {bundle.path} has no network {args.network!r} "
                          f"(it has {sorted(bundle.manifest['networks'])})")
    fused = args.network is not None and args.network.startswith("denoiser_error")
    make_spec = engine_spec.fused_error_spec if fused else engine_spec.denoiser_spec
    channels, size = bundle.denoiser_shape
    spec = make_spec(size, channels, batches)
    engine = build_engine(onnx_path, spec, args.cache_dir, args.opt_level, args.timing_cache, args.workspace_mib,
                          force=args.force)
    print(f"engine: {engine}\nsidecar: {engine.with_suffix('.json')}")
    return 0
