"""Model bundles shipped with cytoedge (see each bundle's manifest.json for its provenance)."""
from __future__ import annotations

from pathlib import Path

DEFAULT_BUNDLE = "pbc32-ddpm"
RED_CELL_BUNDLE = "rbc32-ddpm"


def default_bundle_path() -> Path:
    """The bundled PBC denoiser, used when no ``--model`` is given."""
    return Path(__file__).resolve().parent / DEFAULT_BUNDLE


def red_cell_bundle_path() -> Path | None:
    """The bundled red-cell denoiser (Chula RBC-12), read by ``score`` beside the white cells; None if absent."""
    path = Path(__file__).resolve().parent / RED_CELL_BUNDLE
    return path if (path / "manifest.json").is_file() else None
