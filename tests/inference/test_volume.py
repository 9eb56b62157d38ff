"""Tests for inference.volume: DICOM series to volume, to model space and back."""

from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from scipy import ndimage

from inference.errors import InputError
from inference.volume import (
    Volume,
    load_series,
    load_series_files,
    series_geometry_problems,
    to_model_space,
)
from tests.factories import (
    ORIENTATIONS,
    asymmetric_phantom,
    series_from_ras_volume,
    write_datasets,
)

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
EDGE = DATA / "edge-cases"
MSD = DATA / "hippocampus-msd"
HIPPO_CROPS = [
    DATA / "hippocampus-dicom" / "Study1" / "13_HCropVolume",
    DATA / "hippocampus-dicom" / "Study2" / "14_HCropVolume",
]
#: Common grid the MSD crops and the DICOM crops are resampled to before correlating.
CORRELATION_SHAPE = (30, 40, 24)

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def centroid_lps(volume: Volume, mask: np.ndarray) -> np.ndarray:
    """Centre of mass of a source-order mask in LPS millimetres, via the volume's affine."""
    index = np.argwhere(mask).mean(axis=0)
    return (volume.affine @ np.array([*index, 1.0]))[:3]


def lps_to_ras(point: np.ndarray) -> np.ndarray:
    return point * np.array([-1.0, -1.0, 1.0])


# --- (1) real data: the HippoCrop series against the MSD crops --------------------------------


def _resampled(array: np.ndarray) -> np.ndarray:
    zoomed = ndimage.zoom(
        array.astype(np.float64),
        [m / n for n, m in zip(array.shape, CORRELATION_SHAPE, strict=True)],
        order=1,
    )
    return (zoomed - zoomed.mean()) / zoomed.std()


@pytest.fixture(scope="module")
def mean_msd_image() -> np.ndarray:
    """Mean of all MSD hippocampus images, each z-scored on a common grid."""
    images = [np.asarray(nib.load(p).dataobj) for p in files(MSD / "images")]
    return np.mean([_resampled(image) for image in images], axis=0)


def _correlation(array: np.ndarray, reference: np.ndarray) -> float:
    return float(np.corrcoef(_resampled(array).ravel(), reference.ravel())[0, 1])


@needs_data
@pytest.mark.parametrize("folder", HIPPO_CROPS, ids=lambda p: p.parent.name)
def test_hippocampus_crop_in_ras_matches_readme_and_msd(
    folder: Path, mean_msd_image: np.ndarray
) -> None:
    volume = load_series_files(files(folder))
    model, space = to_model_space(volume, ("R", "A", "S"), spacing_mm=(1.0, 1.0, 1.0))

    # README: transposed to (column, row, slice) and flipped in the first two axes.
    expected = np.flip(volume.array.transpose(2, 1, 0), axis=(0, 1))
    np.testing.assert_array_equal(model, expected)
    assert space.axcodes == ("R", "A", "S")
    assert nib.aff2axcodes(space.affine) == ("R", "A", "S")
    assert space.obliquity_deg == 0.0

    # The data itself agrees: of all 48 axis permutations and flips, RAS correlates best
    # with the mean MSD image, and clearly better than array order.
    scores = {}
    for permutation in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            candidate = volume.array.transpose(permutation)
            candidate = np.flip(candidate, tuple(a for a in range(3) if flips[a]))
            scores[permutation, flips] = _correlation(candidate, mean_msd_image)
    ras = _correlation(model, mean_msd_image)
    naive = scores[(0, 1, 2), (False, False, False)]
    runner_up = max(s for s in scores.values() if not np.isclose(s, ras))
    assert ras > 0.6
    assert naive < 0.2
    assert ras > runner_up + 0.25


# --- (2) MSD case written as DICOM in several orientations ------------------------------------


@needs_data
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_msd_case_round_trip(orientation: str, tmp_path: Path) -> None:
    image_nifti = nib.load(MSD / "images" / "hippocampus_001.nii.gz")
    assert nib.aff2axcodes(image_nifti.affine) == ("R", "A", "S")
    image = np.asarray(image_nifti.dataobj)
    labels = np.asarray(nib.load(MSD / "labels" / "hippocampus_001.nii.gz").dataobj)
    zooms = image_nifti.header.get_zooms()
    spacing = (float(zooms[0]), float(zooms[1]), float(zooms[2]))

    image_series = series_from_ras_volume(
        image, spacing, orientation=orientation, scramble_instance_numbers=True, seed=1
    )
    volume = load_series_files(write_datasets(image_series, tmp_path / "image"))
    model, space = to_model_space(volume, ("R", "A", "S"), spacing_mm=spacing)
    np.testing.assert_array_equal(model, image)

    source_labels = space.to_source(labels)
    assert source_labels.dtype == np.uint8 and source_labels.shape == volume.shape
    # Independently: the label map written as its own series lands on the same voxels.
    label_series = series_from_ras_volume(labels, spacing, orientation=orientation, seed=2)
    np.testing.assert_array_equal(source_labels, load_series(label_series).array)

    anterior = centroid_lps(volume, source_labels == 1)
    posterior = centroid_lps(volume, source_labels == 2)
    assert anterior[1] < posterior[1] - 5.0  # LPS: anterior is more negative y


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("modality", ["MR", "CT"])
def test_phantom_markers_land_where_written(orientation: str, modality: str) -> None:
    image, labels = asymmetric_phantom()
    spacing = (1.0, 1.2, 2.0)
    volume = load_series(
        series_from_ras_volume(image, spacing, modality=modality, orientation=orientation)
    )
    np.testing.assert_allclose(sorted(volume.spacing_mm), sorted(spacing), rtol=1e-6)
    model, space = to_model_space(volume)
    np.testing.assert_array_equal(model, image)
    source_labels = space.to_source(labels)

    # Label 1 is right-anterior-superior of label 2, in patient coordinates from the affine.
    right_anterior_superior = lps_to_ras(centroid_lps(volume, source_labels == 1))
    left_posterior_inferior = lps_to_ras(centroid_lps(volume, source_labels == 2))
    assert np.all(right_anterior_superior > left_posterior_inferior + 5.0)
    # And the bright voxels of the loaded image are exactly those labelled 1.
    np.testing.assert_array_equal(volume.array == 400, source_labels == 1)


def test_other_axcodes_follow_nibabel_convention() -> None:
    image, _ = asymmetric_phantom()
    volume = load_series(series_from_ras_volume(image, (1.0, 1.0, 1.0), orientation="coronal"))
    model, space = to_model_space(volume, ("L", "P", "S"))
    np.testing.assert_array_equal(model, image[::-1, ::-1, :])
    assert nib.aff2axcodes(space.affine) == ("L", "P", "S")
    model, space = to_model_space(volume, ("S", "R", "A"))
    np.testing.assert_array_equal(model, image.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="axcodes"):
        to_model_space(volume, ("R", "L", "S"))


# --- (3) resampling ---------------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


@pytest.mark.parametrize("target", [0.8, 1.5])
def test_resampling_round_trip(target: float) -> None:
    image, labels = asymmetric_phantom((48, 56, 40))
    spacing = (1.0, 1.2, 2.0)
    volume = load_series(series_from_ras_volume(image, spacing, orientation="sagittal"))
    label_volume = load_series(
        series_from_ras_volume(labels, spacing, orientation="sagittal", seed=3)
    )

    model, space = to_model_space(volume, spacing_mm=(target, target, target))
    expected_shape = tuple(round(n * s / target) for n, s in zip(image.shape, spacing, strict=True))
    assert model.shape == space.shape == expected_shape
    assert model.dtype == np.float32
    np.testing.assert_allclose(space.spacing_mm, (target,) * 3)
    np.testing.assert_allclose(np.linalg.norm(space.affine[:3, :3], axis=0), (target,) * 3)

    # The bright marker stays at the same patient position (within a voxel).
    bright = np.argwhere(model > 325).mean(axis=0)
    marker_model = (space.affine @ np.array([*bright, 1.0]))[:3]
    marker_source = lps_to_ras(centroid_lps(volume, volume.array == 400))
    assert np.linalg.norm(marker_model - marker_source) < 0.5 * target + 0.5

    # Labels drawn in model space come back onto the exact source grid.
    model_labels = np.zeros(model.shape, dtype=np.uint8)
    model_labels[model > 325] = 1
    model_labels[(model > 175) & (model <= 325)] = 2
    restored = space.to_source(model_labels)
    assert restored.shape == volume.shape and restored.dtype == np.uint8
    assert _dice(restored == 1, label_volume.array == 1) > 0.85
    with pytest.raises(ValueError, match="shape"):
        space.to_source(model_labels[:-1])


def test_spacing_within_one_percent_is_not_resampled() -> None:
    image, labels = asymmetric_phantom()
    volume = load_series(series_from_ras_volume(image, (1.0, 1.0, 1.0)))
    model, space = to_model_space(volume, spacing_mm=(1.005, 0.995, 1.0))
    np.testing.assert_array_equal(model, image)
    np.testing.assert_array_equal(space.to_source(labels), space.to_source(labels.copy()))
    assert space.shape == space.reoriented_shape


# --- (4) edge cases from dicom2nifti's test data ---------------------------------------------


@needs_data
def test_compressed_transfer_syntaxes_decode_to_the_same_volume() -> None:
    volumes = {
        name: load_series_files(files(EDGE / "generic" / f"compressed_{name}" / "001"))
        for name in ("j2k", "jpegls", "rle")
    }
    reference = volumes["rle"]
    assert reference.shape == (4, 256, 256)
    assert reference.array.dtype == np.float32
    assert 0 <= reference.array.min() and 100 < reference.array.max() < 4096
    for volume in volumes.values():
        np.testing.assert_array_equal(volume.array, reference.array)
        np.testing.assert_array_equal(volume.affine, reference.affine)


@needs_data
def test_jpeg2000_ct_with_blank_uids() -> None:
    datasets = [pydicom.dcmread(p) for p in files(DATA / "ct-abdomen" / "ct_dicom_j2k")]
    with pytest.raises(InputError, match="SeriesInstanceUID is missing"):
        load_series(datasets)
    series_uid = generate_uid(entropy_srcs=["ct_dicom_j2k"])
    for index, ds in enumerate(datasets):
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ct_dicom_j2k", str(index)])
    volume = load_series(datasets)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing_mm == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert volume.array.min() >= -1024 - 1 and volume.array.max() > 300  # HU: air to bone
    z = [(volume.affine @ [k, 0, 0, 1])[2] for k in range(volume.shape[0])]
    assert np.all(np.diff(z) > 0)  # sorted along the normal, inferior to superior


@needs_data
def test_gantry_tilt_is_refused() -> None:
    paths = files(EDGE / "failing" / "gantrytilting" / "001")
    with pytest.raises(InputError, match=r"gantry tilt or sheared stack, about 14\.0 degrees"):
        load_series_files(paths)


@needs_data
@pytest.mark.parametrize("case", ["001", "002"])
def test_missing_slice_is_refused(case: str) -> None:
    with pytest.raises(InputError, match=r"non-uniform slice spacing.*1 slice\(s\) missing"):
        load_series_files(files(EDGE / "failing" / "sliceincrement" / case))


@needs_data
def test_two_slices_load() -> None:
    volume = load_series_files(files(EDGE / "failing" / "slicecount" / "001"))
    assert volume.shape == (2, 256, 256)
    assert volume.spacing_mm == pytest.approx((1.0, 1.0, 1.0))
    headers = [pydicom.dcmread(p) for p in files(EDGE / "failing" / "slicecount" / "001")]
    assert series_geometry_problems(headers) == []


@needs_data
@pytest.mark.parametrize("case", ["001", "001_implicit"])
def test_enhanced_multiframe_is_refused_clearly(case: str) -> None:
    paths = files(EDGE / "philips_enhanced" / "anatomical" / case)
    with pytest.raises(InputError, match="enhanced multi-frame images are not supported"):
        load_series_files(paths)


# --- (5) malformed input ----------------------------------------------------------------------


def _phantom_series(**kwargs: object) -> list[Dataset]:
    image, _ = asymmetric_phantom((12, 14, 10))
    return series_from_ras_volume(image, (1.0, 1.0, 2.0), **kwargs)  # type: ignore[arg-type]


def _del(keyword: str) -> Callable[[list[Dataset]], None]:
    def mutate(datasets: list[Dataset]) -> None:
        delattr(datasets[3], keyword)

    return mutate


def _set(index: int, keyword: str, value: object) -> Callable[[list[Dataset]], None]:
    def mutate(datasets: list[Dataset]) -> None:
        setattr(datasets[index], keyword, value)

    return mutate


def _mix_series(datasets: list[Dataset]) -> None:
    datasets.extend(_phantom_series(seed=9, series_description="other"))


def _duplicate_position(datasets: list[Dataset]) -> None:
    datasets[1].ImagePositionPatient = datasets[0].ImagePositionPatient


def _drop_middle_slice(datasets: list[Dataset]) -> None:
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    del datasets[4]


def _shear(datasets: list[Dataset]) -> None:
    for ds in datasets:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.1 * z, z]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_del("ImagePositionPatient"), "ImagePositionPatient is missing or invalid in 1 of"),
        (_del("ImageOrientationPatient"), "ImageOrientationPatient is missing"),
        (_del("PixelSpacing"), "PixelSpacing is missing"),
        (_mix_series, "images of 2 different series"),
        (
            _set(2, "ImageOrientationPatient", [1, 0, 0, 0, 0.98, 0.199]),
            "ImageOrientationPatient differs",
        ),
        (_set(2, "Rows", 99), r"images differ in size \(Rows x Columns: 14x12, 99x12\)"),
        (_set(2, "NumberOfFrames", 2), "enhanced multi-frame images are not supported"),
        (_set(2, "SOPInstanceUID", ""), "no SOPInstanceUID"),
        (_duplicate_position, "share a slice position"),
        (_drop_middle_slice, "about 1 slice"),
        (_shear, "gantry tilt or sheared stack"),
    ],
)
def test_malformed_series_are_refused_by_name(
    mutate: Callable[[list[Dataset]], None], message: str
) -> None:
    datasets = _phantom_series()
    series_uid = datasets[0].SeriesInstanceUID
    mutate(datasets)
    with pytest.raises(InputError, match=message) as caught:
        load_series(datasets)
    assert series_uid in str(caught.value)
    headers = [copy.deepcopy(ds) for ds in datasets]
    for ds in headers:
        del ds.PixelData
    assert re.search(message, "; ".join(series_geometry_problems(headers)))


def test_valid_series_has_no_problems_and_does_not_sort_by_instance_number() -> None:
    datasets = _phantom_series(scramble_instance_numbers=True)
    assert series_geometry_problems(datasets) == []
    volume = load_series(datasets)
    z = [(volume.affine @ [k, 0, 0, 1])[2] for k in range(volume.shape[0])]
    assert np.all(np.diff(z) > 0)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for k, uid in enumerate(volume.sop_instance_uids):
        assert float(by_uid[uid].ImagePositionPatient[2]) == pytest.approx(z[k])


def test_empty_series_and_missing_pixels_are_refused() -> None:
    with pytest.raises(InputError, match="no images"):
        load_series([])
    datasets = _phantom_series()
    del datasets[0].PixelData
    with pytest.raises(InputError, match="no pixel data"):
        load_series(datasets)


def test_undecodable_pixel_data_names_the_transfer_syntax() -> None:
    datasets = _phantom_series()
    datasets[0].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    with pytest.raises(InputError, match=r"MPEG2 Main Profile / Main Level.*could not be decoded"):
        load_series(datasets)


def test_single_slice_uses_spacing_between_slices() -> None:
    datasets = _phantom_series()[:1]
    datasets[0].SpacingBetweenSlices = 3.5
    volume = load_series(datasets)
    assert volume.shape[0] == 1 and volume.spacing_mm[0] == pytest.approx(3.5)
    del datasets[0].SpacingBetweenSlices
    del datasets[0].SliceThickness
    with pytest.raises(InputError, match="slice spacing is unknown"):
        load_series(datasets)


def test_rescale_is_applied() -> None:
    image, _ = asymmetric_phantom((12, 14, 10))
    datasets = series_from_ras_volume(
        image * 2.5 - 100, (1.0, 1.0, 1.0), rescale_slope=0.5, rescale_intercept=-200
    )
    model, _ = to_model_space(load_series(datasets))
    np.testing.assert_allclose(model, image * 2.5 - 100)
