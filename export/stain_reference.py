"""Refit an existing bundle's stain reference on its training crops, as export/make_bundle.py does.

    python -m cytoedge.export.stain_reference --model models/pbc32-ddpm [--data ../shared/data/pbc/train]

A bundle exported before the Macenko and histogram targets existed has Reinhard's LAB mean and std
only. The crops are those make_bundle takes them on (every tenth training crop, at the training
cache size, from the same cache), so the Reinhard numbers come out as the manifest has them; the
command says so, or refuses when they would change (other crops), unless --replace-reinhard.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from cytoedge.export.make_bundle import stain_reference
from cytoedge.runtime.bundle import ModelBundle, write_manifest
from cytoedge.runtime.errors import BundleError


def main(argv: list[str] | None = None) -> int:
    from cytoedge.training.pbc_data import load_cell_set

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="bundle whose manifest gets the stain reference")
    p.add_argument("--data", type=Path, default=None, help="training crops (default: the manifest's provenance.data)")
    p.add_argument("--cache", type=Path, default=Path(".cache"), help="the training crop cache")
    p.add_argument("--replace-reinhard", action="store_true",
                   help="write the refitted Reinhard mean and std even where they differ from the manifest's")
    args = p.parse_args(argv)
    bundle = ModelBundle.load(args.model)
    manifest = bundle.manifest
    data = args.data or Path(manifest["provenance"]["data"])
    cache_size = round(180.0 / float(manifest["input"].get("source_px_per_model_px", 3.0)))  # make_bundle's rule
    crops = load_cell_set(data, args.cache, cache_size, bundle.class_names).images[::10]
    fitted = stain_reference(crops)
    old = manifest.get("stain_reference") or {}
    same = all(old.get(k) == fitted[k] for k in ("method", "space", "mean", "std"))
    if old and not same and not args.replace_reinhard:
        raise BundleError(f"{args.model}: Reinhard's reference on {len(crops)} crops of {data} is "
                          f"{fitted['mean']}/{fitted['std']}, the manifest's {old.get('mean')}/{old.get('std')}: "
                          "other crops than the bundle's; pass --replace-reinhard to write it anyway")
    fitted["provenance"] = {"data": str(data), "crops": len(crops), "cache_size": cache_size,
                            "command": "python -m cytoedge.export.stain_reference", "date": time.strftime("%Y-%m-%d")}
    manifest["stain_reference"] = fitted
    write_manifest(args.model, manifest)
    print(f"{args.model}: stain_reference refitted on {len(crops)} crops "
          f"(Reinhard {'unchanged' if same else 'replaced'}); macenko {fitted['macenko']['stain_matrix']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
