"""Result outputs of a scored slide: JSON document, per-cell CSV, overlay and gallery PNGs, a
self-contained HTML report and, for DICOM input, DICOM Microscopy Bulk Simple Annotations.

Every writer is a function of the result document (and, for images, of the slide state the
scorer kept: thumbnail, flagged-cell crops, heatmaps); none re-runs a model.
"""
from cytoedge.runtime.reports.writers import write_slide_reports

__all__ = ["write_slide_reports"]
