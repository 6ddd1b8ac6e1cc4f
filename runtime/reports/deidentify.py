"""The DICOM PS3.15 Basic Application Level Confidentiality Profile, applied to a dataset for outputs
that leave the lab (``cytoedge score --deidentify`` writes annotations.deid.dcm with it).

Which attributes the profile touches, and how, is the standard's Table E.1-1 (Basic Profile column)
as the dicom-anonymizer package ships it (Kitware; the newest edition of the table it has), not a
list of ours. That package's own ``anonymize_dataset`` is not used: it applies the actions to
top-level attributes only, so on an annotation object the UIDs inside the Referenced Series
Sequence kept the slide's values while the Referenced Image Sequence was emptied down to its SOP
Class UID (an object pointing at the identified slide, and not a conformant one). Here every
action applies at every depth of the dataset:

- X: removed. Z: kept, zero length (a sequence: no items). U: a UID replaced through ``uids``, so a
  UID that recurs (the slide's study, series and instance in the references) gets one replacement
  everywhere, and objects de-identified with the same map stay linked to each other.
- D: a dummy value of the attribute's VR (dicom-anonymizer's, e.g. "ANONYMIZED", 00010101); a UID
  through ``uids``; a sequence: each item's values likewise.
- The conditional actions are resolved as dicom-anonymizer resolves them, to the choice that never
  removes an attribute an IOD may require: Z/D, X/D and X/Z/D → D, X/Z → Z; X/Z/U* (Referenced
  Image Sequence, Source Image Sequence) keeps the sequence, whose instance UIDs (U) are replaced.
- Any other attribute is kept; a sequence's items are cleaned the same way (Table E.1-1's "K").
- Private attributes are removed (the profile's default for them).

``clean_descriptors`` names descriptors the caller vouches carry nothing identifying (cytoedge's
own annotation labels and descriptions, made of class names and counts): they are kept under the
Clean Descriptors Option, which the code sequence then declares beside the Basic Profile.
"""
from __future__ import annotations

import copy
import pkgutil
from functools import lru_cache
from typing import Iterable, MutableMapping

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from cytoedge.runtime.errors import CytoedgeError

# Table E.1-1 action of each of dicom-anonymizer's categories, the conditional ones resolved as it does.
CATEGORY_ACTIONS = {"X_TAGS": "X", "Z_TAGS": "Z", "D_TAGS": "D", "U_TAGS": "U", "Z_D_TAGS": "D",
                    "X_Z_TAGS": "Z", "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "K"}
BASIC_PROFILE = ("113100", "DCM", "Basic Application Confidentiality Profile")
CLEAN_DESCRIPTORS = ("113105", "DCM", "Clean Descriptors Option")


class DeidentificationError(CytoedgeError):
    """The profile's table (dicom-anonymizer) cannot be had."""


@lru_cache(maxsize=1)
def basic_profile() -> tuple[str, dict[int, str], list[tuple[int, int, int, int, str]]]:
    """(edition, action by tag, (group, element, group mask, element mask, action) of repeating groups)
    from the newest edition of Table E.1-1 that dicom-anonymizer ships."""
    try:
        from dicomanonymizer import dicom_anonymization_databases
        from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
    except ImportError as e:
        raise DeidentificationError(f"the PS3.15 Basic Profile table comes from the dicom-anonymizer package, "
                                    f"which cannot be imported ({e}); pip install dicom-anonymizer") from None
    editions = sorted(m.name for m in pkgutil.iter_modules(dicom_anonymization_databases.__path__)
                      if m.name.startswith("dicomfields_"))
    if not editions:
        raise DeidentificationError("dicom-anonymizer ships no PS3.15 Table E.1-1 (dicomfields_*)")
    table = dicom_anonymization_database_selector(editions[-1])
    actions: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in CATEGORY_ACTIONS.items():
        for entry in table[category]:
            if len(entry) == 4:
                masked.append((*entry, action))
            else:
                actions[int(Tag(*entry))] = action
    return editions[-1].removeprefix("dicomfields_"), actions, masked


def action_of(tag: int) -> str | None:
    """The profile's action for a tag (None: not in Table E.1-1, kept)."""
    _, actions, masked = basic_profile()
    if tag in actions:
        return actions[tag]
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gmask, emask, action in masked:
        if group & gmask == g & gmask and element & emask == e & emask:
            return action
    return None


def deidentify(ds: Dataset, uids: MutableMapping[str, str] | None = None,
               clean_descriptors: Iterable[str] = ()) -> Dataset:
    """A copy of ``ds`` (its file meta included) with the Basic Profile applied; ``ds`` is left as it is.

    ``uids`` maps original to replacement UIDs; new replacements are added to it, so a caller that
    passes one map for several datasets gets the same replacement for a UID they share. The copy says
    what was done: Patient Identity Removed YES, De-identification Method and its Code Sequence (DCM
    113100, and 113105 when ``clean_descriptors`` kept any), Longitudinal Temporal Information
    Modified REMOVED (dates are dummies), and cytoedge as De-identifying Equipment."""
    from highdicom import ContributingEquipment
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    from cytoedge.runtime import __version__

    edition = basic_profile()[0]
    profile = _Profile({} if uids is None else uids, {int(Tag(keyword)) for keyword in clean_descriptors})
    out = copy.deepcopy(ds)
    profile.clean(out)
    if getattr(out, "file_meta", None) is not None:
        profile.clean(out.file_meta)
    out.remove_private_tags()
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = f"cytoedge: PS3.15 Table E.1-1 {edition} Basic Profile"
    out.DeidentificationMethodCodeSequence = [CodedConcept(*code) for code in
                                              (BASIC_PROFILE, *([CLEAN_DESCRIPTORS] if profile.kept else []))]
    out.LongitudinalTemporalInformationModified = "REMOVED"
    equipment = list(out.get("ContributingEquipmentSequence", []))
    equipment.append(ContributingEquipment(manufacturer="cytoedge", manufacturer_model_name="cytoedge",
                                           software_versions=__version__,
                                           purpose_of_reference=codes.DCM.DeIdentifyingEquipment))
    out.ContributingEquipmentSequence = equipment
    return out


class _Profile:
    """The actions applied through a dataset's depth, with the UID map and the descriptors kept."""

    def __init__(self, uids: MutableMapping[str, str], keep: set[int]):
        self.uids, self.keep = uids, keep
        self.kept = False  # whether a descriptor of ``keep`` was met (and so kept)

    def clean(self, ds: Dataset) -> None:
        for elem in list(ds):
            if elem.tag.is_private:
                continue  # removed afterwards, all at once
            if int(elem.tag) in self.keep:
                self.kept = True
                continue
            action = action_of(int(elem.tag))
            if action == "X":
                del ds[elem.tag]
            elif action == "Z":
                elem.value = [] if elem.VR == "SQ" else None
            elif action == "D":
                self.dummy(elem)
            elif action == "U":
                self.replace_uids(elem)
            elif elem.VR == "SQ":
                for item in elem.value:
                    self.clean(item)

    def dummy(self, elem: DataElement) -> None:
        """Table E.1-1's D: a non-empty dummy value of the element's VR (a sequence: its items' values)."""
        from dicomanonymizer.simpledicomanonymizer import replace_element

        if elem.VR == "SQ":
            for item in elem.value:
                for sub in list(item):
                    if int(sub.tag) in self.keep:
                        self.kept = True
                    elif not sub.tag.is_private:
                        self.dummy(sub)
        elif elem.VR == "UI":
            self.replace_uids(elem)
        else:
            try:
                replace_element(elem)
            except NotImplementedError:  # a VR dicom-anonymizer has no dummy for (binary, AT): zero length
                elem.value = None

    def replace_uids(self, elem: DataElement) -> None:
        def new(uid) -> str:
            uid = str(uid)
            if uid and uid not in self.uids:
                self.uids[uid] = str(generate_uid())
            return self.uids.get(uid, "")

        if elem.VM > 1:
            elem.value = [new(u) for u in elem.value]
        elif elem.value not in (None, ""):
            elem.value = new(elem.value)
