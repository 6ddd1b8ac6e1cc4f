"""Model bundles shipped with cytoedge (see each bundle's manifest.json for its provenance)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = "pbc32-ddpm"


def default_bundle_path() -> Path:
    """The bundled PBC denoiser, used when no ``--model`` is given."""
    return Path(__file__).resolve().parent / DEFAULT_BUNDLE
