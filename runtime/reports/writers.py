"""Write every per-slide output into one folder per slide (CSV, overlay, gallery, review page, report,
DICOM annotations) and return what was written."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, MutableMapping

from cytoedge.runtime.errors import CytoedgeError
from cytoedge.runtime.reports.html import render_html, write_html
from cytoedge.runtime.reports.images import gallery, overlay, write_png
from cytoedge.runtime.reports.review import render_review
from cytoedge.runtime.reports.tables import write_csv

if TYPE_CHECKING:
    from cytoedge.runtime.slide_scoring import ScoredSlide

log = logging.getLogger(__name__)


def slide_folder_name(source: str, index: int) -> str:
    """A safe, unique folder name: index and the source's file name."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).name or "slide").strip("_") or "slide"
    return f"{index:03d}_{stem}"


def write_slide_reports(entry: dict, audit: dict, scored: "ScoredSlide | None", out_dir: Path, index: int, dicom_source: bool,
                        deidentify_uids: MutableMapping[str, str] | None = None, run: dict | None = None) -> dict:
    """CSV, overlay, gallery, HTML (and DICOM annotations for DICOM input) for one document entry.

    ``scored`` is what the scorer's stages left of the slide (thumbnail, cell views, heatmap overlays, the
    red-cell sample), or None for a slide that failed.
    ``deidentify_uids`` (a UID map, shared by a run's slides) also writes annotations.deid.dcm, the
    annotations with the PS3.15 Basic Profile applied. ``run`` (``created``, scoring ``options``) goes into
    the review page, and so into its exports.
    """
    folder = out_dir / slide_folder_name(entry["source"], index)
    folder.mkdir(parents=True, exist_ok=True)
    cells = entry.get("cells", [])
    written: dict[str, str] = {}
    written["csv"] = str(write_csv(entry["source"], cells, folder / "cells.csv"))
    overlay_rgb = gallery_rgb = None
    pictures = scored.pictures if scored is not None else None
    if pictures is not None and pictures.thumbnail is not None and pictures.thumbnail.image is not None:
        overlay_rgb = overlay(pictures.thumbnail.image, pictures.thumbnail.scale, cells)
        written["overlay"] = str(write_png(overlay_rgb, folder / "overlay.png"))
    if pictures is not None:
        flagged = [c for c in cells if c["id"] in pictures.explained]
        gallery_rgb = gallery(flagged, pictures.views, pictures.overlays)
        if gallery_rgb is not None:
            written["gallery"] = str(write_png(gallery_rgb, folder / "gallery.png"))
    views = pictures.views if pictures is not None else {}
    if pictures is not None and cells:
        written["review"] = str(write_html(render_review(entry, audit, pictures.views, pictures.overlays, run),
                                           folder / "review.html"))
    written["html"] = str(write_html(render_html(entry, audit, overlay_rgb, gallery_rgb, views,
                                                 "review.html" if "review" in written else None),
                                     folder / "report.html"))
    if dicom_source and cells:
        from cytoedge.runtime.reports.dicom_annotations import write_annotations

        deidentified = folder / "annotations.deid.dcm" if deidentify_uids is not None else None
        try:
            written.update(write_annotations(Path(entry["source"]), cells, audit, folder / "annotations.dcm",
                                             deidentified, deidentify_uids,
                                             scored.red_sample if scored is not None else None))
        except (CytoedgeError, ValueError, TypeError, AttributeError) as e:
            log.warning("%s: DICOM annotations not written (%s)", entry["source"], e)
            written["dicom_annotations_error"] = str(e)
    return written
