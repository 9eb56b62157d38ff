"""The classical body-composition path measured on the real CT in ../shared/data/ct-abdomen."""

from __future__ import annotations

from typing import Any

import nibabel
import numpy as np
import pytest

from inference.bodycomp import classical
from inference.bodycomp.series_choice import SeriesCandidate, choose_series
from tests.conftest import SHARED_DATA

CT = SHARED_DATA / "ct-abdomen"
#: nibabel has no type annotations.
nib: Any = nibabel
#: example_ct_sm is slices 82..111 of example_ct (same voxels; its header keeps the origin).
SM_OFFSET = 82


def axial_stack(name: str) -> np.ndarray:
    """A RAS NIfTI as the (S, P, L) stack the package works in."""
    image = nib.as_closest_canonical(nib.load(CT / name))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    data = np.asarray(image.dataobj, dtype=np.float32)
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    overlap, total = int(np.count_nonzero(a & b)), int(np.count_nonzero(a) + np.count_nonzero(b))
    return 2.0 * overlap / max(1, total)


@pytest.fixture(scope="module")
def sm_labels() -> np.ndarray:
    """The classical labels of every slice of example_ct_sm (3 mm pixels)."""
    return np.stack([classical.segment_slice(s, (3.0, 3.0)) for s in axial_stack("example_ct_sm.nii.gz")])


def test_compartments_agree_with_totalsegmentator_tissue_masks(sm_labels: np.ndarray) -> None:
    reference = {
        classical.MUSCLE: axial_stack("tissue_types_on_ct_sm/skeletal_muscle.nii.gz") > 0,
        classical.SUBCUTANEOUS_FAT: axial_stack("tissue_types_on_ct_sm/subcutaneous_fat.nii.gz") > 0,
        classical.VISCERAL_FAT: axial_stack("tissue_types_on_ct_sm/torso_fat.nii.gz") > 0,
    }
    scores = {label: dice(sm_labels == label, mask) for label, mask in reference.items()}
    print("Dice", scores)
    # Measured 0.869 / 0.927 / 0.857 (README). Fat meets the targets (0.90 subcutaneous, 0.85
    # visceral); muscle does not reach its 0.90 yet and is guarded against regressions.
    assert scores[classical.SUBCUTANEOUS_FAT] >= 0.90
    assert scores[classical.VISCERAL_FAT] >= 0.85
    assert scores[classical.MUSCLE] > 0.86


def test_psoas_is_muscle_and_the_vertebra_is_not(sm_labels: np.ndarray) -> None:
    totalseg = np.rint(axial_stack("totalseg_fast_on_ct_sm.nii.gz")).astype(np.uint8)
    muscle = sm_labels == classical.MUSCLE
    iliopsoas = np.isin(totalseg, [88, 89])  # TotalSegmentator v2: iliopsoas left, right
    # vertebrae C1..S1 (v2 ids 26-50) and the spinal cord (79): marrow and canal contents lie in
    # the muscle window and must not be taken for the psoas beside them
    spine = np.isin(totalseg, list(range(26, 51)) + [79])
    covered = np.count_nonzero(muscle & iliopsoas) / np.count_nonzero(iliopsoas)
    print("iliopsoas covered", covered, "muscle pixels in the spine", np.count_nonzero(muscle & spine))
    assert covered >= 0.55  # measured 0.659 (0.250 before the psoas was looked for)
    # measured 86 pixels, at the edges of the back muscles against the arches (partial volume;
    # 84 before the psoas was looked for)
    assert np.count_nonzero(muscle & spine) <= 100


def test_thoracic_mode_has_no_visceral_class() -> None:
    stack = axial_stack("example_ct_sm.nii.gz")
    labels = classical.segment_slice(stack[15], (3.0, 3.0), thoracic=True)
    assert set(np.unique(labels)) <= {0, classical.MUSCLE, classical.SUBCUTANEOUS_FAT}


def _vertebral_body_centre(vertebrae: np.ndarray, value: int) -> float:
    z, y, _ = np.nonzero(vertebrae == value)
    anterior = y < np.median(y)  # rows run anterior to posterior: the body, not the arch
    return float(z[anterior].mean())


def test_levels_against_the_vertebra_map() -> None:
    vertebrae = axial_stack("totalseg_fast_on_ct_sm.nii.gz").astype(np.uint8)
    t12, l1 = _vertebral_body_centre(vertebrae, 32), _vertebral_body_centre(vertebrae, 31)
    small = classical.find_levels(axial_stack("example_ct_sm.nii.gz"), (3.0, 3.0, 3.0))
    assert small.anchor == "ribs"
    assert abs(small.levels["L1"] - l1) * 3.0 < 6.0  # measured 1.5 mm
    full = classical.find_levels(axial_stack("example_ct.nii.gz"), (3.0, 3.0, 3.0))
    assert full.anchor == "pelvis"
    assert abs(full.levels["L1"] - (l1 + SM_OFFSET)) * 3.0 < 6.0  # measured 4.5 mm
    assert abs(full.levels["T12"] - (t12 + SM_OFFSET)) * 3.0 < 6.0  # measured 2.7 mm
    # L3 is one body below L2 and lies below the part covered by the vertebra map.
    assert full.levels["L3"] < SM_OFFSET
    assert 30.0 < (full.levels["L2"] - full.levels["L3"]) * 3.0 < 40.0


def test_series_choice_prefers_soft_tissue_kernel_then_thickness() -> None:
    bone = SeriesCandidate("1.2.1", "B70f", 3.0, 100)
    soft_thin = SeriesCandidate("1.2.2", "B30f", 0.6, 500)
    soft = SeriesCandidate("1.2.3", "Br38f\\3", 3.0, 100)
    assert choose_series([bone, soft_thin, soft]) is soft
    assert choose_series([bone, soft_thin]) is soft_thin
    with pytest.raises(ValueError):
        choose_series([])
