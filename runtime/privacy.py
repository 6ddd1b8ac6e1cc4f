"""Patient identifiers from DICOM headers: kept out of cytoedge's results, reports and logs by default.

Nothing a slide's header says about the patient, the study or the specimen is part of a result
document, a CSV, a report or a log line, unless ``--include-identifiers`` (``score``) or
``include_identifiers`` (the daemon's configuration) asks for :func:`header_identifiers` in the
summary. The DICOM annotation object is the one output that carries the identifiers a PACS links
it by (runtime/reports/dicom_annotations.py); its de-identified variant carries none
(runtime/reports/deidentify.py). docs/privacy.md says what is kept and what is dropped.

pydicom and highdicom quote header values in what they say while reading or building: an invalid
date ("Invalid value for VR DA: '1970-01-01'"), a person name without a "^", a value that cannot be
converted. :func:`redacted_diagnostics` holds their warnings and log records back while a header's
identifiers are handled and says them afterwards with every identifying value (an attribute of
PS3.15's Basic Profile table, or any person name) replaced.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from typing import Iterator

log = logging.getLogger(__name__)

# summary.identifiers (--include-identifiers): block → JSON key → DICOM keyword, where the header has it.
IDENTIFIERS = {
    "patient": {"name": "PatientName", "id": "PatientID", "issuer_of_id": "IssuerOfPatientID",
                "birth_date": "PatientBirthDate", "sex": "PatientSex"},
    "study": {"instance_uid": "StudyInstanceUID", "id": "StudyID", "accession_number": "AccessionNumber",
              "date": "StudyDate", "time": "StudyTime", "referring_physician": "ReferringPhysicianName",
              "description": "StudyDescription"},
    "series": {"instance_uid": "SeriesInstanceUID", "number": "SeriesNumber"},
    "instance": {"sop_instance_uid": "SOPInstanceUID"},
    "specimen": {"container_identifier": "ContainerIdentifier"},
}
REDACTED = "[identifier]"
MIN_REDACTED_LENGTH = 3  # shorter values (a sex "F", a study ID "1") are not replaced inside messages
LIBRARY_LOGGERS = ("pydicom", "highdicom")


def header_identifiers(ds) -> dict:
    """The header's patient, study, series, instance and specimen identifiers (see IDENTIFIERS), each
    block with the attributes the header has, the specimens' identifiers listed under "specimen"."""
    out: dict[str, dict] = {}
    for block, keys in IDENTIFIERS.items():
        values = {key: str(ds.get(keyword)) for key, keyword in keys.items() if ds.get(keyword) not in (None, "")}
        if values:
            out[block] = values
    specimens = [str(item.get("SpecimenIdentifier")) for item in ds.get("SpecimenDescriptionSequence", [])
                 if item.get("SpecimenIdentifier")]
    if specimens:
        out.setdefault("specimen", {})["specimen_identifiers"] = specimens
    return out


class Redactor:
    """Replaces, in a message, every identifying value of the datasets it was given: a whole value
    wherever it occurs, a part of a person's name where it stands as a word of its own."""

    def __init__(self) -> None:
        self.values: set[str] = set()
        self.words: set[str] = set()

    def add(self, ds) -> None:
        """Learn the identifying values of ``ds`` (at any depth): those of attributes in the Basic
        Profile's table and of every person name, with a name's spaced form and its components."""
        from cytoedge.runtime.reports.deidentify import action_of, basic_profile

        basic_profile()  # a missing table is said here, not wrapped in pydicom's walk

        def visit(dataset, elem) -> None:
            if elem.VR == "SQ" or (elem.VR != "PN" and action_of(int(elem.tag)) is None):
                return
            for value in (elem.value if elem.VM > 1 else [elem.value]):
                text = str(value or "").strip()
                forms = {text}
                if elem.VR == "PN":
                    forms.add(" ".join(text.replace("^", " ").split()))
                    self.words.update(w for part in re.split(r"[\^= ]", text)
                                      if len(w := part.strip()) >= MIN_REDACTED_LENGTH)
                self.values.update(f for f in forms if len(f) >= MIN_REDACTED_LENGTH)

        ds.walk(visit)

    def __call__(self, text: str) -> str:
        for value in sorted(self.values, key=len, reverse=True):
            text = re.sub(re.escape(value), REDACTED, text, flags=re.IGNORECASE)
        for word in sorted(self.words, key=len, reverse=True):
            text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", REDACTED, text, flags=re.IGNORECASE)
        return text


class _Holding(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))


@contextlib.contextmanager
def redacted_diagnostics(name: str) -> Iterator[Redactor]:
    """Hold back pydicom's and highdicom's warnings and log records inside the block; after it (an
    exception included), say each once as a log record for ``name``, at its level (a warning at
    WARNING), with the values the yielded Redactor learnt replaced."""
    redactor = Redactor()
    holding = _Holding()
    loggers = [logging.getLogger(n) for n in LIBRARY_LOGGERS]
    propagate = [lg.propagate for lg in loggers]
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for lg in loggers:
                lg.addHandler(holding)
                lg.propagate = False
            try:
                yield redactor
            finally:
                for lg, before in zip(loggers, propagate):
                    lg.removeHandler(holding)
                    lg.propagate = before
    finally:
        said: dict[tuple[int, str], str] = {}  # pydicom both logs and warns the same words: said once
        for level, origin, message in holding.records + [(logging.WARNING, w.category.__name__, str(w.message))
                                                         for w in caught]:
            said.setdefault((level, message), origin)
        for (level, message), origin in said.items():
            log.log(level, "%s: %s: %s", name, origin, redactor(message))
