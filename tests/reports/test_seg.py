"""Tests for reports.seg: a valid binary SEG whose frames line up with the source slices."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.base import Structure
from reports.identity import Identity
from reports.seg import build_segmentation

from .conftest import ANATOMICAL_STRUCTURE, HIPPOCAMPUS

STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


def _build(
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


def _frames_by_source(segmentation: Dataset) -> dict[tuple[str, int], np.ndarray]:
    pixels = segmentation.pixel_array
    if pixels.ndim == 2:
        pixels = pixels[None]
    frames = {}
    for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames[(str(source.ReferencedSOPInstanceUID), number)] = pixels[index]
    return frames


def test_segmentation_valid_and_aligned(
    tmp_path: Path,
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    path = tmp_path / "seg.dcm"
    _build(source_images, label_map, structures, identity).save_as(path, enforce_file_format=True)

    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.segment_numbers == [1, 2]
    for number, structure in enumerate(structures, start=1):
        description = seg.get_segment_description(number)
        assert description.segment_label == structure.name
        assert description.segmented_property_category.value == ANATOMICAL_STRUCTURE[0]
        assert description.segmented_property_type.value == HIPPOCAMPUS[0]
        rgb = hd.color.CIELabColor.from_dicom_value(
            tuple(description.RecommendedDisplayCIELabValue)
        ).to_rgb()
        assert np.allclose(rgb, structure.colour_rgb, atol=2)
        assert description.SegmentAlgorithmType == "AUTOMATIC"
        assert description.SegmentAlgorithmName == identity.algorithm_name
    modifier = seg.get_segment_description(2).SegmentedPropertyTypeCodeSequence[0]
    assert modifier.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"

    # Frame k refers to source image k and holds exactly that slice of the label map.
    uids = [str(ds.SOPInstanceUID) for ds in source_images]
    frames = _frames_by_source(seg)
    for (uid, number), frame in frames.items():
        k = uids.index(uid)
        assert np.array_equal(frame.astype(bool), label_map[k] == structures[number - 1].label)
    for k, uid in enumerate(uids):
        for number, structure in enumerate(structures, start=1):
            if (label_map[k] == structure.label).any():
                assert (uid, number) in frames
    assert len(frames) == int(seg.NumberOfFrames)

    for keyword in STUDY_KEYWORDS:
        assert str(seg.get(keyword)) == str(source_images[0].get(keyword)), keyword
    assert seg.StudyDescription == "MR RCBV SEQUENCE"
    assert seg.SeriesNumber == 901
    assert seg.SeriesDescription == "Hippocampus segmentation"
    assert seg.Manufacturer == "dicom-node"
    assert seg.SoftwareVersions == identity.software_versions
    assert "PatientBirthDate" in seg and "PatientSex" in seg


def test_sources_are_not_modified(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
) -> None:
    _build(source_images, label_map, structures, identity)
    assert "PatientBirthDate" not in source_images[0]
    assert "PixelData" in source_images[0]


def test_empty_structure_keeps_every_frame(
    tmp_path: Path,
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    absent = Structure(3, "hippocampal cyst", ANATOMICAL_STRUCTURE, HIPPOCAMPUS, (250, 220, 40))
    path = tmp_path / "seg-empty.dcm"
    _build(source_images, label_map, (*structures, absent), identity).save_as(path)

    assert dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.segment_numbers == [1, 2, 3]
    assert int(seg.NumberOfFrames) == 3 * len(source_images)
    frames = _frames_by_source(seg)
    assert all(not frame.any() for (_, number), frame in frames.items() if number == 3)
    assert sum(int(frame.sum()) for frame in frames.values()) == int((label_map > 0).sum())


def test_all_empty_label_map_is_still_valid(
    tmp_path: Path,
    source_images: list[Dataset],
    structures: tuple[Structure, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    empty = np.zeros((len(source_images), source_images[0].Rows, source_images[0].Columns), np.uint8)
    path = tmp_path / "seg-all-empty.dcm"
    _build(source_images, empty, structures, identity).save_as(path)

    assert dciodvfy(path) == []
    assert int(pydicom.dcmread(path).NumberOfFrames) == 2 * len(source_images)


def test_shape_mismatch_is_rejected(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
) -> None:
    with pytest.raises(ValueError, match="does not match the source series"):
        _build(source_images, label_map[:-1], structures, identity)
    with pytest.raises(ValueError, match="does not match the source series"):
        _build(source_images, label_map.transpose(0, 2, 1), structures, identity)


def test_unknown_label_is_rejected(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
) -> None:
    with pytest.raises(ValueError, match=r"labels \[2\] that no structure describes"):
        _build(source_images, label_map, structures[:1], identity)
