"""``cytoedge doctor``: which denoiser backends can run here, and why not.

Also reports the onnxruntime + onnxruntime-gpu both-installed state (they overwrite each other).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="show available backends and why others are not", description=__doc__)
    p.add_argument("--model", type=Path, default=None, help="bundle whose TensorRT engine to look for")
    p.add_argument("--cache-dir", type=Path, default=None, help="engine cache to search")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cytoedge.models import default_bundle_path
    from cytoedge.runtime.backends.select import backend_availability, onnxruntime_conflict
    from cytoedge.runtime.bundle import ModelBundle
    from cytoedge.runtime.errors import BundleError

    try:
        bundle = ModelBundle.load(args.model or default_bundle_path())
        bundle_line = f"{bundle.name} ({bundle.path})"
    except BundleError as e:
        bundle, bundle_line = None, f"not loadable: {e}"
    rows = backend_availability(bundle, args.cache_dir)
    auto = next(r.name for r in rows if r.available)
    conflict = onnxruntime_conflict()
    if args.json:
        print(json.dumps({"bundle": bundle_line, "auto": auto, "onnxruntime_conflict": conflict,
                          "backends": [{"name": r.name, "available": r.available, "reason": r.reason,
                                        "engine": str(r.engine) if r.engine else None} for r in rows]}, indent=2))
        return 0
    print(f"python {platform.python_version()} on {platform.machine()}; bundle: {bundle_line}")
    for r in rows:
        print(f"  {'yes' if r.available else 'no ':4} {r.name:20} {r.reason}")
    print(f"auto selects: {auto}")
    if conflict:
        print(f"PROBLEM: {conflict}")
    return 1 if conflict else 0
