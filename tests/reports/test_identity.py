"""Tests for reports.identity: study attributes copied into results, stable identification."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from reports.identity import (
    Identity,
    build_algorithm_identification,
    copy_study_attributes,
    source_headers,
)
from reports.uids import derive_uid


def _source() -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = "1.2.3"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ds.StudyDescription = "MR BRAIN"
    ds.PatientWeight = 61.5
    ds.OtherPatientIDsSequence = [Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = "OLD-1"
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    return ds


def test_fills_missing_and_empty_keeps_present() -> None:
    target = Dataset()
    target.StudyInstanceUID = "1.2.3"
    target.PatientName = ""
    target.PatientID = "KEEP"
    copy_study_attributes(_source(), target)
    assert target.StudyDescription == "MR BRAIN"
    assert target.PatientName == "Doe^Jane"
    assert target.PatientID == "KEEP"
    assert target.PatientWeight == 61.5
    assert target.OtherPatientIDsSequence[0].PatientID == "OLD-1"
    assert "PatientSize" not in target


def test_refuses_another_study() -> None:
    target = Dataset()
    target.StudyInstanceUID = "9.9.9"
    with pytest.raises(ValueError, match="is not the source study"):
        copy_study_attributes(_source(), target)


def test_headers_carry_type2_attributes_without_touching_sources() -> None:
    source = _source()
    (header,) = source_headers([source])
    assert header["PatientBirthDate"].is_empty and header["PatientSex"].is_empty
    assert "PatientBirthDate" not in source


def test_identification_is_stable() -> None:
    identity = Identity(
        manufacturer_model_name="dicom-node",
        software_versions="0.1.0",
        device_serial_number="n1",
        algorithm_name="net",
        algorithm_version="2",
    )
    assert identity.device_uid == Identity(**{**identity.__dict__}).device_uid
    assert identity.device_uid.startswith("2.25.") and len(identity.device_uid) <= 64
    assert derive_uid("a", "b") == derive_uid("a", "b") != derive_uid("a", "c")
    sequence = build_algorithm_identification(identity)
    assert sequence[0].AlgorithmName == "net"
    assert sequence[0].AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
