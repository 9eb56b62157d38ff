"""Tests for the side of a hippocampus crop, judged from its position relative to the midline."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.hippocampus.analysis import HippocampusAnalysis
from inference.hippocampus.side import determine_side
from inference.volume import load_series
from reports.normal_range import patient_age_years, percentile_statement
from tests.conftest import HIPPO_CROP_STUDY1


def crop_affine(x_origin_mm: float) -> np.ndarray:
    """A 1 mm series whose first array axis runs along +x (towards the patient's left, LPS)."""
    affine = np.eye(4)
    affine[:3, 3] = (x_origin_mm, -30.0, -20.0)
    return affine


def labels_at(first_axis: slice) -> np.ndarray:
    labels = np.zeros((30, 40, 36), dtype=np.uint8)
    labels[first_axis, 10:30, 10:20] = 1
    return labels


@pytest.mark.parametrize(("x_origin_mm", "side"), [(10.0, "left"), (-46.0, "right")])
def test_side_from_the_position_in_patient_coordinates(x_origin_mm: float, side: str) -> None:
    # indices 12-23 of a crop starting at x = 10 mm lie at x = 22-33 mm: the patient's left (LPS)
    result = determine_side(crop_affine(x_origin_mm), labels_at(slice(12, 24)))
    assert (result.side, result.reason) == (side, "")


@pytest.mark.parametrize(("affine", "labels", "reason"), [
    (np.eye(4), labels_at(slice(12, 24)), "placeholder coordinates"),
    (crop_affine(-18.0), labels_at(slice(12, 24)), "spans the midline"),
    (crop_affine(2.0), labels_at(slice(0, 10)), "closer than 10 mm"),
    (crop_affine(10.0), np.zeros((30, 40, 36), dtype=np.uint8), "no hippocampus"),
])
def test_side_unknown_says_why(affine: np.ndarray, labels: np.ndarray, reason: str) -> None:
    result = determine_side(affine, labels)
    assert result.side == "unknown" and reason in result.reason


def test_real_crop_has_placeholder_coordinates_so_side_unknown() -> None:
    volume = load_series([pydicom.dcmread(p) for p in sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))])
    analysis = HippocampusAnalysis()
    analysis.load("cpu")
    result = analysis.run(volume)
    assert result.side == "unknown" and "placeholder coordinates" in result.side_reason, result.side_reason
    assert all(s.laterality is None for s in result.structures)


def patient(**attributes: str) -> Dataset:
    ds = Dataset()
    ds.StudyDate = "20200119"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_age_from_patient_age_or_birth_date() -> None:
    assert patient_age_years(patient(PatientAge="072Y")) == 72
    assert patient_age_years(patient(PatientAge="018M")) == 1.5
    assert patient_age_years(patient(PatientBirthDate="19500119")) == pytest.approx(70.0, abs=0.01)
    assert patient_age_years(patient()) is None
    assert patient_age_years(patient(PatientBirthDate="20300101")) is None


def test_no_percentile_names_every_missing_item() -> None:
    complete = percentile_statement(patient(PatientAge="072Y", PatientSex="M"), "left", "")
    assert complete.startswith("No percentile: no published normative data")
    assert "missing" not in complete
    bare = percentile_statement(patient(PatientSex="O"), "unknown", "the series spans the midline")
    assert "also missing: age" in bare and "sex (PatientSex is not M or F)" in bare
    assert "side (the series spans the midline)" in bare
