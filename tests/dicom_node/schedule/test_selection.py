from __future__ import annotations

from dataclasses import replace

import pytest

from dicom_node.state.records import SeriesInfo
from dicom_node.schedule.selection import check_series, select_series, slice_orientation
from inference.base import SeriesRule

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def series(**changes: object) -> SeriesInfo:
    base = SeriesInfo(
        series_uid="1.2.3", study_uid="1.2", modality="MR", description="HippoCrop",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4", manufacturer="GE", rows=51, columns=35,
        orientation=AXIAL, pixel_spacing=(1.0, 1.0), slice_thickness=1.0,
        number_of_frames=None, instance_count=32,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


RULE = SeriesRule(modalities=("MR",), description_pattern="hippo|hcrop", max_matrix=160,
                  max_spacing_mm=3.0)


def test_crop_series_is_selected() -> None:
    assert check_series(series(), RULE, 20) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"modality": "CT"}, "modality CT is not MR"),
        ({"modality": "SEG"}, "not an image series"),
        ({"manufacturer": "dicom-node"}, "result of this node"),
        ({"description": "T1post"}, "description does not match"),
        ({"instance_count": 12}, "12 slices, fewer than the minimum of 20"),
        ({"rows": 512, "columns": 512}, "matrix 512x512 is larger than 160"),
        ({"slice_thickness": 5.0}, "spacing 5 mm is coarser than 3 mm"),
    ],
)
def test_reasons_are_specific(changes: dict[str, object], reason: str) -> None:
    found = check_series(series(**changes), RULE, 20)
    assert found is not None and reason in found


def test_rule_minimum_overrides_default() -> None:
    rule = replace(RULE, min_slices=5)
    assert check_series(series(instance_count=6), rule, 20) is None
    assert check_series(series(instance_count=6), RULE, 20) is not None


def test_multiframe_counts_frames() -> None:
    assert check_series(series(instance_count=1, number_of_frames=40), RULE, 20) is None


@pytest.mark.parametrize(
    ("iop", "plane"), [(AXIAL, "axial"), (SAGITTAL, "sagittal"), (CORONAL, "coronal")]
)
def test_slice_orientation(iop: tuple[float, ...], plane: str) -> None:
    assert slice_orientation(iop) == plane


def test_orientation_rule() -> None:
    rule = replace(RULE, orientation="axial")
    assert check_series(series(orientation=SAGITTAL), rule, 20) == "sagittal slices, not axial"


def test_selection_explains_not_applicable() -> None:
    selection = select_series([series(series_uid="1.9", description="T1post")], RULE, 20)
    assert not selection.selected
    assert "series 1.9 (T1post): description does not match" in selection.explain()


def test_several_series_can_be_selected() -> None:
    chosen = select_series([series(series_uid="1.1"), series(series_uid="1.2")], RULE, 20)
    assert [s.series_uid for s in chosen.selected] == ["1.1", "1.2"]


def test_a_rule_can_choose_one_series_per_study() -> None:
    from inference.bodycomp.series_choice import choose_series

    rule = SeriesRule(modalities=("CT",), min_slices=20, choose=choose_series)
    ct = {"modality": "CT", "description": "abdomen"}
    sharp = series(series_uid="1.1", convolution_kernel="B70f", slice_thickness=3.0, **ct)
    thin = series(series_uid="1.2", convolution_kernel="B30f", slice_thickness=0.6, **ct)
    soft = series(series_uid="1.3", convolution_kernel="B30f", slice_thickness=3.0, **ct)
    chosen = select_series([sharp, thin, soft], rule, 20)
    assert [s.series_uid for s in chosen.selected] == ["1.3"]
    assert dict((i.series_uid, r) for i, r in chosen.passed_over) == {
        "1.1": "series 1.3 of the same study was preferred",
        "1.2": "series 1.3 of the same study was preferred",
    }
