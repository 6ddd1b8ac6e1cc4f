"""Labelled cell folders (``root/<class>/<image>``): listing, and the fixed fit/held-out split."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cytoedge.runtime.cells import IMAGE_SUFFIXES
from cytoedge.runtime.errors import CytoedgeError

SPLIT_RULE = "sha256(file name) first byte even -> fit half, odd -> held-out half"


def list_labelled_files(root: Path, class_names: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files under ``root/<class>/`` sorted by class then name; ids follow ``class_names``."""
    root = Path(root)
    if not root.is_dir():
        raise CytoedgeError(f"labelled data folder {root} does not exist (expected {root}/<class>/<image>)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    class_names = list(class_names) if class_names is not None else found
    missing = [c for c in class_names if c not in found]
    if missing:
        raise CytoedgeError(f"labelled data folder {root} has no folder for class(es) {missing}")
    files, labels = [], []
    for k, name in enumerate(class_names):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(k)
    return files, np.asarray(labels, dtype=np.int64), class_names


def in_fit_half(path: Path) -> bool:
    """The fixed split between fitting calibration and reporting on held-out cells (see SPLIT_RULE)."""
    return hashlib.sha256(Path(path).name.encode()).digest()[0] % 2 == 0


def select_half(files: list[Path], labels: np.ndarray, half: str) -> tuple[list[Path], np.ndarray]:
    if half == "all":
        return files, labels
    if half not in ("fit", "held-out"):
        raise CytoedgeError(f"half must be 'fit', 'held-out' or 'all', got {half!r}")
    keep = np.array([in_fit_half(f) == (half == "fit") for f in files], bool)
    return [f for f, k in zip(files, keep) if k], labels[keep]


def stratified_subset(labels: np.ndarray, per_class: int | None, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_class`` cells of each class (all when None), in original order."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def labelled_subset(root: Path, class_names: list[str], half: str, per_class: int | None,
                    seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """The files and labels of one half of a labelled folder, at most ``per_class`` per class."""
    files, labels, _ = list_labelled_files(root, class_names)
    files, labels = select_half(files, labels, half)
    keep = stratified_subset(labels, per_class, seed)
    return [files[i] for i in keep], labels[keep]
