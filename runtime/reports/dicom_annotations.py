"""DICOM Microscopy Bulk Simple Annotations (highdicom) for a scored DICOM slide.

One annotation group per predicted class (cell boxes as RECTANGLE in the total pixel matrix,
2D image coordinates), with the class probability and the anomaly score as measurements, and
the algorithm identified by the model name, bundle hash and cytoedge version. The annotation
object references the source slide's study, series and SOP instance, so a viewer shows it on top.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cytoedge.runtime.errors import InputImageError

log = logging.getLogger(__name__)

TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                     "StudyTime", "ReferringPhysicianName", "AccessionNumber")


def build_annotations(source_path: Path, cells: list[dict], audit: dict):
    """The annotation dataset (highdicom MicroscopyBulkSimpleAnnotations) for ``cells``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

    try:
        source = pydicom.dcmread(source_path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as e:
        raise InputImageError(f"{source_path}: cannot read the slide to annotate ({e})") from None
    for keyword in TYPE2_FROM_SOURCE:  # highdicom copies these; a slide may leave type-2 attributes out
        if keyword not in source:
            setattr(source, keyword, "")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=audit.get("model", "cytoedge"), family=Code("123109", "DCM", "Diagnostic Imaging Algorithm"),
        version=f"cytoedge {audit.get('cytoedge_version', '?')} bundle {audit.get('bundle_sha256', '')[:16]}",
        parameters={"estimator": str(audit.get("estimator", ""))})
    groups = []
    for number, cls in enumerate(sorted({c["class"] for c in cells}), start=1):
        members = [c for c in cells if c["class"] == cls]
        rects = [np.array([[b[0], b[1]], [b[2], b[1]], [b[2], b[3]], [b[0], b[3]]], np.float64)
                 for b in (c["bbox"] for c in members)]
        prob = np.array([(c.get("probabilities") or {}).get(cls, np.nan) for c in members], np.float32)
        measurements = [hd.ann.Measurements(name=Code("C0440099", "UMLS", "Probability"), values=prob,
                                            unit=Code("1", "UCUM", "no units"))]
        groups.append(hd.ann.AnnotationGroup(
            number=number, uid=generate_uid(), label=cls,
            annotated_property_category=Code("91723000", "SCT", "Anatomical structure"),
            annotated_property_type=Code("4421005", "SCT", "Cell"),
            graphic_type=hd.ann.GraphicTypeValues.RECTANGLE, graphic_data=rects,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, measurements=measurements,
            description=f"cytoedge: {len(members)} cells predicted {cls}"))
    from cytoedge.runtime import __version__

    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cytoedge",
        manufacturer_model_name=audit.get("model", "cytoedge"), software_versions=__version__,
        device_serial_number="none", content_description="cytoedge white-cell classification",
        content_label="CYTOEDGE")


def write_annotations(source_path: Path, cells: list[dict], audit: dict, path: Path) -> Path:
    build_annotations(source_path, cells, audit).save_as(path)
    return path
