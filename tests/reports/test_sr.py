"""Tests for reports.sr: a valid TID 1500 report referencing the SEG segments it measures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from inference.base import Finding, Measurement, Structure
from reports.identity import Identity
from reports.seg import build_segmentation
from reports.sr import LABEL_SCHEME, build_measurement_report

from .conftest import CUBIC_MILLIMETRE, MR_BRAIN, VOLUME

SEED = "1.2.3|hippocampus|1.2.0"


@pytest.fixture(scope="module")
def segmentation(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
) -> Dataset:
    return build_segmentation(
        source_images,
        label_map,
        structures,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        series_number=901,
        series_description="Hippocampus segmentation",
        identity=identity,
    )


def _build(
    source_images: list[Dataset],
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    segmentation: Dataset | None,
    identity: Identity,
    label_map: np.ndarray | None = None,
) -> Dataset:
    return build_measurement_report(
        source_images,
        structures,
        measurements,
        findings,
        segmentation=segmentation,
        label_map=label_map,
        procedure_reported=MR_BRAIN,
        tracking_seed=SEED,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        series_number=902,
        series_description="Hippocampus volumes",
        identity=identity,
    )


def test_report_valid_and_references_segments(
    tmp_path: Path,
    source_images: list[Dataset],
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    segmentation: Dataset,
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    path = tmp_path / "sr.dcm"
    _build(source_images, structures, measurements, findings, segmentation, identity).save_as(path)

    assert dciodvfy(path) == []
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert sr.ConceptNameCodeSequence[0].CodingSchemeDesignator == "DCM"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.SeriesNumber == 902
    assert sr.StudyDescription == source_images[0].StudyDescription
    assert sr.AccessionNumber == source_images[0].AccessionNumber
    assert sr.StudyInstanceUID == source_images[0].StudyInstanceUID
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert str(segmentation.SOPInstanceUID) in evidence
    assert {str(ds.SOPInstanceUID) for ds in source_images} <= evidence

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [s.name for s in structures]
    for number, (group, structure) in enumerate(zip(groups, structures, strict=True), start=1):
        referenced = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == segmentation.SOPInstanceUID
        assert referenced.ReferencedSOPClassUID == segmentation.SOPClassUID
        assert int(referenced.ReferencedSegmentNumber) == number
        assert group.referenced_segment[1].UID == source_images[0].SeriesInstanceUID
        assert group.finding_type.value == structure.property_type[0]
        (measured,) = group.get_measurements()
        expected = next(m for m in measurements if m.structure_label == structure.label)
        assert measured.name.value == VOLUME[0]
        assert measured.value == pytest.approx(expected.value)
        assert (measured.unit.value, measured.unit.scheme_designator) == CUBIC_MILLIMETRE[:2]

    image_groups = report.get_image_measurement_groups()
    assert [g.tracking_identifier for g in image_groups] == ["whole series", "hippocampal atrophy"]
    (total,) = image_groups[0].get_measurements()
    assert total.value == pytest.approx(measurements[-1].value)

    finding_group = image_groups[1]
    evaluations = [
        e for e in finding_group.get_qualitative_evaluations() if e.name.value == "404684003"
    ]
    assert [(e.value.value, e.value.scheme_designator) for e in evaluations] == [
        ("absent", LABEL_SCHEME)
    ]
    probabilities = {m.name.meaning: m.value for m in finding_group.get_measurements()}
    assert probabilities == {"Probability of absent": 0.83, "Probability of present": 0.17}
    assert all(m.unit.value == "1" for m in finding_group.get_measurements())
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == LABEL_SCHEME


def test_each_structure_is_outlined_where_it_is_largest(
    tmp_path: Path,
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    segmentation: Dataset,
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    """Planar ROI groups locate each tracked structure on a source image (what OHIF shows)."""
    path = tmp_path / "sr-outlined.dcm"
    sr = _build(source_images, structures, measurements, findings, segmentation, identity, label_map)
    sr.save_as(path)
    assert dciodvfy(path) == []
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    volumetric = report.get_volumetric_roi_measurement_groups()
    whole_series = report.get_image_measurement_groups()[0]
    planar = report.get_planar_roi_measurement_groups()
    # The same tracked entities as the measured groups, in the same order.
    assert [(g.tracking_identifier, g.tracking_uid) for g in planar] == [
        (g.tracking_identifier, g.tracking_uid) for g in [*volumetric, whole_series]
    ]
    masks = [label_map == s.label for s in structures] + [label_map > 0]
    uids = [str(ds.SOPInstanceUID) for ds in source_images]
    for group, mask in zip(planar, masks, strict=True):
        assert group.get_measurements() == []  # the volumes stay in the volumetric groups
        region = group.roi
        assert region is not None and region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert np.array_equal(points[0], points[-1])  # closed
        (image,) = region.ContentSequence
        assert image.RelationshipType == "SELECTED FROM"
        index = uids.index(str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        areas = mask.sum(axis=(1, 2))
        assert areas[index] == areas.max()  # the largest cross-section
        # The outline encloses exactly the structure's pixels on that slice.
        rows, columns = np.indices(mask.shape[1:])
        centres = np.column_stack([columns.ravel() + 0.5, rows.ravel() + 0.5])
        inside = MplPath(points).contains_points(centres).reshape(mask.shape[1:])
        assert np.array_equal(inside, mask[index])


def test_a_structure_no_single_outline_shows_gets_no_location(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    segmentation: Dataset,
    identity: Identity,
) -> None:
    ringed = label_map.copy()
    ringed[label_map == 2] = 0
    ringed[14:20, 26:36, 10:26] = 2
    ringed[14:20, 28:34, 12:24] = 0  # the posterior structure is now a ring on every slice
    sr = _build(source_images, structures, measurements, (), segmentation, identity, ringed)
    report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
    assert isinstance(report, hd.sr.MeasurementReport)
    planar = report.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in planar] == [structures[0].name]
    assert len(report.get_volumetric_roi_measurement_groups()) == 2  # the volumes are all there


def test_tracking_uids_are_deterministic(
    source_images: list[Dataset],
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    segmentation: Dataset,
    identity: Identity,
) -> None:
    def tracking_uids() -> list[str]:
        sr = _build(source_images, structures, measurements, findings, segmentation, identity)
        report = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True).content
        assert isinstance(report, hd.sr.MeasurementReport)
        return [
            g.tracking_uid
            for g in (
                *report.get_volumetric_roi_measurement_groups(),
                *report.get_image_measurement_groups(),
            )
        ]

    first, second = tracking_uids(), tracking_uids()
    assert first == second
    assert len(set(first)) == len(first) == 4


def test_measurements_only_without_segmentation(
    tmp_path: Path,
    source_images: list[Dataset],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    path = tmp_path / "sr-findings.dcm"
    _build(source_images, (), measurements[-1:], findings, None, identity).save_as(path)

    assert dciodvfy(path) == []
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert report.get_volumetric_roi_measurement_groups() == []
    assert len(report.get_image_measurement_groups()) == 2


def test_inconsistent_inputs_are_rejected(
    source_images: list[Dataset],
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    segmentation: Dataset,
    identity: Identity,
) -> None:
    with pytest.raises(ValueError, match="without the segmentation"):
        _build(source_images, structures, measurements, (), None, identity)
    with pytest.raises(ValueError, match=r"labels \[2\] that no structure has"):
        _build(source_images, structures[:1], measurements, (), segmentation, identity)
    with pytest.raises(ValueError, match="expected one per structure"):
        _build(source_images, structures[::-1], measurements, (), segmentation, identity)
    with pytest.raises(ValueError, match="nothing to report"):
        _build(source_images, (), (), (), None, identity)
    with pytest.raises(ValueError, match="label map has 3 slices for 32 source images"):
        _build(source_images, structures, measurements, (), segmentation, identity,
               np.zeros((3, 8, 8), dtype=np.uint8))
