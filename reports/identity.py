"""Who made a result (equipment, algorithm) and whose study it belongs to (patient, study)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from reports.protocols import Code
from reports.uids import derive_uid

logger = logging.getLogger(__name__)

#: Algorithm family "Artificial Intelligence" (DCM 123110, CID 7162).
ARTIFICIAL_INTELLIGENCE: Code = ("123110", "DCM", "Artificial Intelligence")

#: Patient and study attributes every result carries over from its source, in the order
#: they are filled. Study-level fields a PACS shows in its study list (StudyDescription
#: above all) come from whichever instance it reads, so a result must not lack them.
STUDY_ATTRIBUTES: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientWeight",
    "PatientSize",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
)

#: Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1).
#: highdicom reads them as attributes of the first source image, so they must exist
#: (possibly empty) there; anonymised studies often lack them.
_TYPE2_PATIENT_STUDY: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)

_PIXEL_DATA = Tag(0x7FE0, 0x0010)


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Equipment and algorithm identification written into every result.

    Parameters
    ----------
    manufacturer_model_name
        Name of the product that created the result (Manufacturer's Model Name).
    software_versions
        Version of that product (Software Versions).
    device_serial_number
        Serial number of this installation (Device Serial Number).
    algorithm_name
        Name of the algorithm (model) that produced the result.
    algorithm_version
        Version of that algorithm.
    algorithm_family
        Coded algorithm family (CID 7162), by default Artificial Intelligence.
    manufacturer
        Manufacturer of the creating equipment.
    institution_name
        Institution where the result was created, or ``None`` to omit it.
    """

    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    algorithm_name: str
    algorithm_version: str
    algorithm_family: Code = ARTIFICIAL_INTELLIGENCE
    manufacturer: str = "dicom-node"
    institution_name: str | None = None

    @property
    def device_uid(self) -> str:
        """A UID for this device, the same on every run (used as Device Observer UID)."""
        return derive_uid(
            "device", self.manufacturer, self.manufacturer_model_name, self.device_serial_number
        )


def coded(code: Code) -> hd.sr.CodedConcept:
    """Turn a plain ``(value, scheme designator, meaning)`` tuple into a coded concept.

    Parameters
    ----------
    code
        The code as plain data.

    Returns
    -------
    highdicom.sr.CodedConcept
        The same code for highdicom.
    """
    value, scheme, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def build_algorithm_identification(identity: Identity) -> hd.AlgorithmIdentificationSequence:
    """Build the Algorithm Identification Sequence (segments, PS3.3 C.8.20.2).

    Parameters
    ----------
    identity
        Where the algorithm name, version and family come from.

    Returns
    -------
    highdicom.AlgorithmIdentificationSequence
        The sequence, with the manufacturer as algorithm source.
    """
    return hd.AlgorithmIdentificationSequence(
        name=identity.algorithm_name,
        family=coded(identity.algorithm_family),
        version=identity.algorithm_version,
        source=identity.manufacturer,
    )


def build_sr_algorithm_identification(identity: Identity) -> hd.sr.AlgorithmIdentification:
    """Build the SR algorithm identification (TID 4019) for measurement groups.

    Parameters
    ----------
    identity
        Where the algorithm name and version come from.

    Returns
    -------
    highdicom.sr.AlgorithmIdentification
        The content items naming the algorithm.
    """
    return hd.sr.AlgorithmIdentification(
        name=identity.algorithm_name,
        version=identity.algorithm_version,
        family=coded(identity.algorithm_family),
        manufacturer=identity.manufacturer,
    )


class EquipmentKwargs(TypedDict):
    """General Equipment keyword arguments shared by highdicom's constructors."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str
    institution_name: str | None


def equipment_kwargs(identity: Identity) -> EquipmentKwargs:
    """Return the General Equipment keyword arguments of highdicom constructors.

    Parameters
    ----------
    identity
        Where the equipment identification comes from.

    Returns
    -------
    EquipmentKwargs
        ``manufacturer``, ``manufacturer_model_name``, ``software_versions``,
        ``device_serial_number`` and ``institution_name`` (``None`` omits it).
    """
    return EquipmentKwargs(
        manufacturer=identity.manufacturer,
        manufacturer_model_name=identity.manufacturer_model_name,
        software_versions=identity.software_versions,
        device_serial_number=identity.device_serial_number,
        institution_name=identity.institution_name,
    )


def source_headers(source_images: Sequence[Dataset]) -> list[Dataset]:
    """Return header-only copies of the sources with Type 2 patient/study attributes present.

    highdicom reads PatientBirthDate, PatientSex, AccessionNumber and others as attributes
    of the first source and fails when an anonymised source lacks them; a missing Type 2
    attribute is equivalent to an empty one (PS3.5 7.4), so the copies carry them empty.
    The caller's datasets are not modified.

    Parameters
    ----------
    source_images
        The source datasets.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One copy per source, in the same order, without Pixel Data.
    """
    headers = []
    for source in source_images:
        header = Dataset()
        for element in source:
            if element.tag != _PIXEL_DATA:
                header.add(element)
        for keyword in _TYPE2_PATIENT_STUDY:
            if keyword not in header:
                setattr(header, keyword, None)
        headers.append(header)
    return headers


def copy_study_attributes(source: Dataset, target: Dataset) -> None:
    """Copy patient and study attributes from a source image into a result, in place.

    An attribute is copied when the source has a non-empty value and the target lacks
    it or holds it empty; values the target already has are kept.

    Parameters
    ----------
    source
        A dataset of the source study.
    target
        The result to complete.

    Raises
    ------
    ValueError
        If source and target belong to different studies.
    """
    target_study = target.get("StudyInstanceUID")
    if target_study and target_study != source.get("StudyInstanceUID"):
        raise ValueError(
            f"cannot copy study attributes: target study {target_study} is not the "
            f"source study {source.get('StudyInstanceUID')}"
        )
    for keyword in STUDY_ATTRIBUTES:
        if keyword not in source or source[keyword].is_empty:
            continue
        if keyword in target and not target[keyword].is_empty:
            continue
        element = source[keyword]
        target.add(copy.deepcopy(element))
    logger.debug("copied study attributes into %s", target.get("SOPInstanceUID"))
