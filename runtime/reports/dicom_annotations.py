"""DICOM Microscopy Bulk Simple Annotations (highdicom) for a scored DICOM slide.

One annotation group per predicted class (cell boxes as RECTANGLE in the total pixel matrix,
2D image coordinates), with the class probability as a measurement, and the algorithm
identified by the model name, bundle hash and cytoedge version. The annotation object references
the source slide's study, series and SOP instance, so a viewer shows it on top.

It carries from the slide what a PACS files it by, and nothing more (docs/privacy.md): the Study
Instance UID and the slide's series and instance (Common Instance Reference), and Patient ID,
Patient Name and Accession Number as the slide has them; the other Type 2 attributes of the Patient
and General Study modules are present and empty. highdicom's constructor copies every root attribute
of the Patient, Study and Specimen modules of the dataset it is given (Type 3 ones such as other
patient IDs or the patient's age, the optional Patient Study and Clinical Trial modules, the slide's
container and specimen identifiers) and the scanner's institution and station as contributing
equipment, so it is given the slide's header reduced to the attributes above, never the header.
``write_annotations(..., deidentified=PATH)`` also writes the object with the PS3.15 Basic Profile
applied (deidentify.py).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import MutableMapping

import numpy as np

from cytoedge.runtime.errors import CytoedgeError, InputImageError

log = logging.getLogger(__name__)

LINKAGE = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber")  # copied as the slide has them
EMPTIED = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID")  # Type 2
REFERENCED = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID")  # Common Instance Reference
FRAME = ("FrameOfReferenceUID",)  # checked by highdicom (one frame of reference); a 2D object does not carry it
CHARACTER_SET = ("SpecificCharacterSet",)  # how the copied names are encoded
# Said by a slide that was itself de-identified: the copied identifiers are then pseudonyms, and the object says so.
DEIDENTIFIED = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
# Type 1C/2C of the Patient module, required when the patient is an animal: copied when the slide has them.
NON_HUMAN = ("PatientSpeciesDescription", "PatientSpeciesCodeSequence", "PatientBreedDescription",
             "PatientBreedCodeSequence", "BreedRegistrationSequence", "ResponsiblePerson", "ResponsiblePersonRole",
             "ResponsibleOrganization")
# cytoedge's own descriptors, made of class names and counts: kept in the de-identified object (Clean Descriptors).
OWN_DESCRIPTORS = ("AnnotationGroupLabel", "AnnotationGroupDescription")


def linkage_header(source_path: Path):
    """The slide's header reduced to what the annotation object carries (see the module docstring)."""
    import pydicom
    from pydicom.dataset import Dataset

    copied = LINKAGE + REFERENCED + FRAME + CHARACTER_SET + DEIDENTIFIED + NON_HUMAN
    try:
        header = pydicom.dcmread(source_path, stop_before_pixels=True, specific_tags=list(copied))
    except (OSError, EOFError, ValueError, pydicom.errors.InvalidDicomError) as e:
        raise InputImageError(f"{source_path}: cannot read the slide to annotate ({e})") from None
    for keyword in ("StudyInstanceUID",) + REFERENCED:
        if header.get(keyword) in (None, ""):
            raise InputImageError(f"{source_path}: DICOM attribute {keyword} is missing; the annotations "
                                  "could not reference the slide")
    reduced = Dataset()
    for keyword in copied:
        if keyword in header:
            reduced[keyword] = header[keyword]
    for keyword in LINKAGE[1:] + EMPTIED:
        if keyword not in reduced:
            setattr(reduced, keyword, "")
    return reduced


def build_annotations(source_path: Path, cells: list[dict], audit: dict, red_cells: dict | None = None):
    """The annotation dataset (highdicom MicroscopyBulkSimpleAnnotations) for ``cells``. A header
    highdicom refuses is an InputImageError naming the slide, with the header's identifiers replaced
    in what highdicom said (as in its warnings: runtime/privacy.py)."""
    from cytoedge.runtime.privacy import redacted_diagnostics

    with redacted_diagnostics(str(source_path)) as redact:
        source = linkage_header(source_path)
        redact.add(source)
        try:
            return _annotations(source, cells, audit, red_cells)
        except (CytoedgeError, OSError):
            raise
        except Exception as e:  # highdicom's and pydicom's words may quote the header: redacted
            raise InputImageError(f"{source_path}: DICOM annotations cannot be built from the slide's header "
                                  f"({type(e).__name__}: {redact(str(e))})") from None


def _annotations(source, cells: list[dict], audit: dict, red_cells: dict | None):
    import highdicom as hd
    from pydicom.sr.coding import Code
    from pydicom.uid import generate_uid

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
    red = (red_cells or {}).get("cells", [])
    red_algorithm = hd.AlgorithmIdentificationSequence(
        name=(red_cells or {}).get("model", "cytoedge"), family=Code("123109", "DCM", "Diagnostic Imaging Algorithm"),
        version=f"cytoedge {audit.get('cytoedge_version', '?')} bundle {(red_cells or {}).get('bundle_sha256', '')[:16]}")
    for cls in sorted({c["class"] for c in red}):  # the red cells read, as points
        points = [np.array([c["centre"]], np.float64) for c in red if c["class"] == cls]  # one (x, y) each
        groups.append(hd.ann.AnnotationGroup(
            number=len(groups) + 1, uid=generate_uid(), label=f"red cell: {cls}",
            annotated_property_category=Code("91723000", "SCT", "Anatomical structure"),
            annotated_property_type=Code("41898006", "SCT", "Erythrocyte"),
            graphic_type=hd.ann.GraphicTypeValues.POINT, graphic_data=points,
            algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC,
            algorithm_identification=red_algorithm,
            description=f"cytoedge: {len(points)} sampled red cells read as {cls}"))
    from cytoedge.runtime import __version__

    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[source], annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cytoedge",
        manufacturer_model_name=audit.get("model", "cytoedge"), software_versions=__version__,
        device_serial_number="none", content_description="cytoedge white-cell classification",
        content_label="CYTOEDGE")


def write_annotations(source_path: Path, cells: list[dict], audit: dict, path: Path,
                      deidentified: Path | None = None, uids: MutableMapping[str, str] | None = None,
                      red_cells: dict | None = None) -> dict[str, str]:
    """Write the annotation object to ``path`` and, given ``deidentified``, the object with the PS3.15
    Basic Profile applied there (UIDs replaced through ``uids``: one map for a run keeps the objects of
    one study in one new study). ``red_cells`` (the scorer's ``red_sample``: model, bundle hash, cells with
    centre and class) add one POINT group per red-cell class.
    Returns the paths written, by output name."""
    import pydicom

    from cytoedge.runtime.privacy import redacted_diagnostics
    from cytoedge.runtime.reports.deidentify import deidentify

    annotations = build_annotations(source_path, cells, audit, red_cells)
    with redacted_diagnostics(str(source_path)) as redact:
        redact.add(annotations)
        try:
            annotations.save_as(path)
            written = {"dicom_annotations": str(path)}
            if deidentified is not None:
                deidentify(pydicom.dcmread(path), uids, OWN_DESCRIPTORS).save_as(deidentified,
                                                                                 enforce_file_format=True)
                written["dicom_annotations_deidentified"] = str(deidentified)
        except (CytoedgeError, OSError):
            raise
        except Exception as e:  # what pydicom says may quote the copied identifiers: redacted
            raise CytoedgeError(f"{source_path}: cannot write the DICOM annotations ({type(e).__name__}: "
                                f"{redact(str(e))})") from None
    return written
