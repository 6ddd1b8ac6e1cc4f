"""Privacy by default (docs/privacy.md). `cytoedge score` on a DICOM slide whose header carries made-up
identifiers, run as a user runs it, leaves none of them in any output that is not DICOM (results,
CSV, report, images, run log, what it prints) unless --include-identifiers asks for them in
results.json; annotations.dcm links to the slide's study with what the standard requires and no
more; annotations.deid.dcm has the PS3.15 Basic Profile applied; the daemon's journal, messages and
log hold no identifier either."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from cytoedge.runtime.privacy import Redactor, redacted_diagnostics
from cytoedge.runtime.reports.deidentify import deidentify
from cytoedge.runtime.reports.dicom_annotations import EMPTIED, LINKAGE, OWN_DESCRIPTORS, build_annotations
from cytoedge.runtime.synthetic_smear import SmearSpec, frames_of, generate_smear, write_wsi_dicom

CLI = [sys.executable, "-m", "cytoedge.runtime.cli"]


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


# Made-up identifiers: every attribute of the Basic Profile's table our writer can set, each value distinctive
# (8 characters or more, so a scan of PNG and base64 bytes cannot meet it by chance).
MADE_UP = {
    "PatientName": "Doe^Jane", "PatientID": "MRN-0042-XYZ", "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC-77-QQ", "IssuerOfPatientID": "GENERAL-HOSP-MRN", "StudyID": "STUDY-5150",
    "StudyDate": "20240315", "StudyTime": "101112.5", "SeriesDate": "20240316", "ContentDate": "20240317",
    "AcquisitionDateTime": "20240315101500", "StudyDescription": "Smear of Jane Doe 2024",
    "SeriesDescription": "Series for MRN-0042", "ProtocolName": "Protocol-Jane-77",
    "InstitutionName": "Saint Elsewhere Hospital", "InstitutionAddress": "1 Hospital Road, Springfield",
    "InstitutionalDepartmentName": "Haematology Dept 7B", "StationName": "SCANNER-ROOM-12",
    "DeviceSerialNumber": "SN-998877-AB", "ReferringPhysicianName": "House^Gregory",
    "OperatorsName": "Tech^Olga-Marie", "PerformingPhysicianName": "Surgeon^Samuel",
    "NameOfPhysiciansReadingStudy": "Reader^Rita", "PhysiciansOfRecord": "Record^Robert",
    "RequestingPhysician": "Requester^Rachel", "PatientAddress": "42 Wallaby Way, Sydney",
    "PatientTelephoneNumbers": "555-0199-321", "EthnicGroup": "Martian-Colony", "Occupation": "Lion tamer nr 9",
    "PatientComments": "allergic to penicillin zzq", "AdditionalPatientHistory": "History of xyzzy disease",
    "MedicalAlerts": "Alert-Latex-QQ", "Allergies": "Allergy-Peanut-QQ", "PatientAge": "055Y",
    "PatientSex": "F", "ContainerIdentifier": "SLIDE-BARCODE-4242",
    "OtherPatientIDsSequence": [_item(PatientID="OTHER-ID-5555", TypeOfPatientID="TEXT")],
    "SpecimenDescriptionSequence": [_item(SpecimenIdentifier="SPEC-991-KK", SpecimenUID=pydicom.uid.generate_uid(),
                                          IssuerOfTheSpecimenIdentifierSequence=[],
                                          SpecimenPreparationSequence=[])],
}
# Carried by annotations.dcm, as the slide has them: what a PACS files it by.
LINKED = ("PatientName", "PatientID", "AccessionNumber")
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def _strings(value) -> list[str]:
    if isinstance(value, list):  # a sequence: the strings of its items' elements
        return [s for item in value for elem in item for s in _strings(elem.value)]
    return [] if value is None else [str(value)]


def needles(header: Dataset, keywords=None) -> dict[str, list[bytes]]:
    """For each made-up identifier (and the slide's UIDs), the byte forms a scan looks for: the value,
    lower-cased, and a name's DICOM ^ as a space."""
    keywords = keywords or [*MADE_UP, *UID_KEYWORDS]
    out = {}
    for keyword in keywords:
        for value in _strings(header[keyword].value if keyword in header else ""):
            if len(value) < 8:
                continue  # a sex or an age: too short to scan for, checked in the DICOM objects instead
            forms = {value, value.replace("^", " ")}
            out[f"{keyword}={value}"] = sorted({f.lower().encode() for f in forms})
    return out


def found(data: bytes, wanted: dict[str, list[bytes]]) -> list[str]:
    low = data.lower()
    return [name for name, forms in wanted.items() if any(f in low for f in forms)]


@pytest.fixture(scope="module")
def slide(bundle, ort_backend, tmp_path_factory) -> tuple[Path, Dataset]:
    """A small DICOM WSI of four drawn white cells whose header carries the made-up identifiers."""
    smear = generate_smear(bundle, ort_backend, SmearSpec(n_white=4, ddim_steps=5, seed=3))
    h, w = smear.rgb.shape[:2]
    path = tmp_path_factory.mktemp("slides").resolve() / "slide.dcm"
    write_wsi_dicom(path, frames_of(smear.rgb, 256), (w, h), 256, smear.um_per_px, organisation="TILED_FULL",
                    identifiers=MADE_UP)
    return path, pydicom.dcmread(path, stop_before_pixels=True)


def score(slide_path: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CYTOEDGE_RUN_LOG": str(out / "runs.sqlite3")}  # a run log, where there is one, is scanned
    return subprocess.run([*CLI, "-v", "score", str(slide_path), "--out", str(out), "--threads", "1", *flags],
                          capture_output=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def scored(slide, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("scored") / "out"
    run = score(slide[0], out, "--deidentify")
    assert run.returncode == 0, run.stderr.decode()
    return out, run


def test_no_identifier_in_any_output_but_the_dicom_ones(slide, scored):
    out, run = scored
    wanted = needles(slide[1])
    assert len(wanted) >= 30 and "PatientName=Doe^Jane" in wanted
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm")
    assert {"results.json", "cells.csv", "report.html", "overlay.png"} <= {p.name for p in files}
    assert {p.name for p in out.rglob("*.dcm")} == {"annotations.dcm", "annotations.deid.dcm"}
    leaks = {str(p.relative_to(out)): found(p.read_bytes(), wanted) for p in files}
    leaks["stdout"], leaks["stderr"] = found(run.stdout, wanted), found(run.stderr, wanted)
    assert not {k: v for k, v in leaks.items() if v}
    document = json.loads((out / "results.json").read_text())
    assert "identifiers" not in document["slides"][0]["summary"]


def test_include_identifiers_puts_them_in_results_json_only(slide, tmp_path):
    out = tmp_path / "out"
    run = score(slide[0], out, "--include-identifiers", "--quiet")
    assert run.returncode == 0, run.stderr.decode()
    identifiers = json.loads((out / "results.json").read_text())["slides"][0]["summary"]["identifiers"]
    assert identifiers["patient"] == {"name": "Doe^Jane", "id": "MRN-0042-XYZ", "issuer_of_id": "GENERAL-HOSP-MRN",
                                      "birth_date": "19700101", "sex": "F"}
    assert identifiers["study"]["accession_number"] == "ACC-77-QQ"
    assert identifiers["study"]["instance_uid"] == slide[1].StudyInstanceUID
    assert identifiers["specimen"] == {"container_identifier": "SLIDE-BARCODE-4242",
                                       "specimen_identifiers": ["SPEC-991-KK"]}
    wanted = needles(slide[1])
    assert "PatientID=MRN-0042-XYZ" in found((out / "results.json").read_bytes(), wanted)  # the scan can fail
    others = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".dcm" and p.name != "results.json"]
    assert others and not any(found(p.read_bytes(), wanted) for p in others)
    assert not found(run.stderr, wanted)


def _walk_keywords(ds: Dataset) -> set[str]:
    seen: set[str] = set()
    ds.walk(lambda _, elem: seen.add(elem.keyword))
    return seen


def test_annotations_link_to_the_study_and_carry_nothing_more(slide, scored):
    source = slide[1]
    path = next(scored[0].rglob("annotations.dcm"))
    ann = pydicom.dcmread(path)
    assert ann.StudyInstanceUID == source.StudyInstanceUID
    assert [ann[k].value for k in LINKED] == [source[k].value for k in LINKED]
    series = ann.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ann.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    for keyword in EMPTIED:  # Type 2: present, empty
        assert keyword in ann and ann[keyword].value in ("", None), keyword
    carried = _walk_keywords(ann)
    own = {"ContentDate", "DeviceSerialNumber"}  # the object's own date and equipment, not the slide's
    assert not carried & (set(MADE_UP) - set(LINKED) - set(EMPTIED) - own)
    assert "FrameOfReferenceUID" not in carried  # 2D coordinates: no frame of reference
    assert not found(path.read_bytes(), needles(source, [k for k in MADE_UP if k not in LINKED]))


def test_linkage_covers_the_type_1_and_2_attributes_of_patient_and_general_study():
    """What the annotation object carries or empties is exactly the Type 1 and 2 root attributes of the
    IOD's mandatory Patient and General Study modules, as highdicom's copy of the standard lists them."""
    from highdicom._standard_utils import get_module_attribute_map  # the standard's tables, as highdicom uses them

    modules = get_module_attribute_map()
    required = {a["keyword"] for m in ("patient", "general-study") for a in modules[m]
                if not a["path"] and a["type"] in ("1", "2")}
    assert required == set(LINKAGE) | set(EMPTIED)


def test_deidentified_annotations(slide, scored):
    source = slide[1]
    folder = next(scored[0].rglob("annotations.dcm")).parent
    path = folder / "annotations.deid.dcm"
    identified, deid = pydicom.dcmread(folder / "annotations.dcm"), pydicom.dcmread(path)
    assert not found(path.read_bytes(), needles(source))  # identifiers and the slide's UIDs alike
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID"):
        assert deid[keyword].value in ("", None), keyword
    assert deid.PatientIdentityRemoved == "YES"
    codes = [(c.CodeValue, c.CodingSchemeDesignator) for c in deid.DeidentificationMethodCodeSequence]
    assert ("113100", "DCM") in codes and ("113105", "DCM") in codes  # Basic Profile; cytoedge's labels kept
    assert "Basic Profile" in deid.DeidentificationMethod
    for uid in (deid.StudyInstanceUID, deid.SeriesInstanceUID, deid.SOPInstanceUID):
        assert UID(uid).is_valid and uid not in (identified.StudyInstanceUID, identified.SeriesInstanceUID,
                                                 identified.SOPInstanceUID, source.StudyInstanceUID)
    referenced = deid.ReferencedSeriesSequence[0]
    new_sop = referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID
    assert UID(new_sop).is_valid and new_sop != source.SOPInstanceUID
    assert deid.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_sop  # one replacement per UID
    assert referenced.SeriesInstanceUID != source.SeriesInstanceUID
    assert deid.file_meta.MediaStorageSOPInstanceUID == deid.SOPInstanceUID
    assert deid.ReferencedImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    read, original = (hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(d) for d in (deid, identified))
    groups, before = read.get_annotation_groups(), original.get_annotation_groups()
    assert [g.label for g in groups] == [g.label for g in before]
    for g, b in zip(groups, before):
        assert np.array_equal(np.asarray(g.get_graphic_data(coordinate_type=read.AnnotationCoordinateType)),
                              np.asarray(b.get_graphic_data(coordinate_type=original.AnnotationCoordinateType)))


def test_deidentify_is_pure_and_one_map_keeps_objects_linked(slide, scored):
    source = slide[1]
    identified = pydicom.dcmread(next(scored[0].rglob("annotations.dcm")))
    before = identified.to_json_dict()
    uids: dict[str, str] = {}
    first, second = (deidentify(identified, uids, OWN_DESCRIPTORS) for _ in range(2))
    assert identified.to_json_dict() == before  # the input is left as it is
    assert first.StudyInstanceUID == second.StudyInstanceUID == uids[source.StudyInstanceUID]
    assert first.ReferencedImageSequence[0].ReferencedSOPInstanceUID == uids[source.SOPInstanceUID]
    assert first.ReferencedSeriesSequence[0].SeriesInstanceUID == uids[source.SeriesInstanceUID]
    assert deidentify(identified).StudyInstanceUID != first.StudyInstanceUID  # a new map: a new pseudonym
    plain = deidentify(identified)
    assert {g.AnnotationGroupLabel for g in plain.AnnotationGroupSequence} == {"ANONYMIZED"}  # the profile's D
    assert [c.CodeValue for c in plain.DeidentificationMethodCodeSequence] == ["113100"]


def test_library_messages_quoting_the_header_are_redacted(tmp_path, caplog):
    """highdicom warns with the patient name when it has no "^"; pydicom quotes invalid values."""
    path = write_wsi_dicom(tmp_path / "s.dcm", frames_of(np.full((64, 64, 3), 200, np.uint8), 64), (64, 64), 64,
                           0.25, identifiers={"PatientName": "QUINELLA JANE DOE", "PatientID": "MRN-0042-XYZ"})
    cells = [{"class": "neutrophil", "bbox": [1, 2, 30, 40], "probabilities": {"neutrophil": 0.9}}]
    with warnings.catch_warnings(record=True) as shown, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        ann = build_annotations(path, cells, {"model": "m"})
    assert str(ann.PatientName) == "QUINELLA JANE DOE"
    said = caplog.text + "".join(str(w.message) for w in shown)
    assert "person name" in said and "QUINELLA" not in said.upper()

    with redacted_diagnostics("x.dcm") as redact:
        header = Dataset()
        header.PatientName, header.PatientBirthDate = "Doe^Jane", "1970-01-01"  # pydicom warns: held back
        redact.add(header)
    message = "Unable to convert '1970-01-01' to 'DA' for DOE JANE (Doe^Jane); Jane does not match"
    assert redact(message) == ("Unable to convert '[identifier]' to 'DA' for [identifier] ([identifier]); "
                               "[identifier] does not match")
    assert "1970-01-01" not in caplog.text
    assert Redactor()(message) == message


def test_the_daemon_journals_and_logs_no_identifier(slide, bundle, tmp_path, caplog):
    from cytoedge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from cytoedge.runtime.service.client import ScannerLinkClient
    from cytoedge.runtime.service.scorer_binding import SlideScorerFactory
    from cytoedge.runtime.slide_scoring import ScoringOptions
    from cytoedge.runtime.sources import plain_open
    from test_service_daemon import running_daemon

    path = tmp_path / "slides" / "slide.dcm"
    path.parent.mkdir()
    path.write_bytes(slide[0].read_bytes())
    factory = SlideScorerFactory(bundle, OnnxRuntimeBackend(bundle, threads=1), "fast", ScoringOptions(heatmaps=False),
                                 include_identifiers=True)  # the configuration key, as `cytoedge serve` passes it
    job = factory.new_job()
    cells = list(job.score_path(path, None, plain_open))
    assert job.summary()["identifiers"]["patient"]["id"] == "MRN-0042-XYZ"

    factory.include_identifiers = False  # the default
    with caplog.at_level(logging.DEBUG), running_daemon(tmp_path, factory) as daemon, \
            ScannerLinkClient(daemon.endpoint, timeout_s=120) as client:
        records, summary = client.wait_result(client.submit_path(path))
    assert len(records) == len(cells) and summary["state"] in ("scored", "delivered")
    assert "identifiers" not in summary["summary"]
    wanted = needles(slide[1])
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("journal.sqlite3*"))
    assert journal and not found(journal, wanted)
    assert not found(json.dumps([records, summary]).encode(), wanted)
    assert not found(caplog.text.encode(), wanted)


def test_the_daemon_key_is_off_by_default_and_must_be_a_boolean(tmp_path):
    from cytoedge.runtime.service.config import ConfigError, load_config

    assert load_config(None, {}).include_identifiers is False
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"include_identifiers": True}))
    assert load_config(config, {}).include_identifiers is True
    config.write_text(json.dumps({"include_identifiers": "yes"}))
    with pytest.raises(ConfigError, match="include_identifiers must be true or false"):
        load_config(config, {})
