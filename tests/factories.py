"""Geometry-valid synthetic DICOM series for tests, built from RAS-ordered arrays."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

import nibabel
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    PYDICOM_IMPLEMENTATION_UID,
    generate_uid,
)

#: nibabel has no type annotations.
nib: Any = nibabel

#: Acquisition orientations as (row cosine, column cosine) in LPS, DICOM PS3.3 C.7.6.2.1.1.
#: The row cosine is the direction of increasing column index, the column cosine that of
#: increasing row index.
ORIENTATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "oblique-ish": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}

#: Rotation applied to the whole grid for ``orientation="oblique-ish"``: small enough that the
#: closest orientation is still axial.
OBLIQUE_AXIS = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
OBLIQUE_DEG = 6.0

#: Where :func:`asymmetric_phantom` puts its two structures, as fractions of the RAS shape:
#: label 1 towards right-anterior-superior, label 2 towards left-posterior-inferior.
MARKER_FRACTIONS = {1: (0.72, 0.7, 0.68), 2: (0.3, 0.32, 0.35)}


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' rotation matrix about a unit axis."""
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    # numpy's stubs type a ufunc of a scalar as Any; the sum is a 3x3 float array.
    rotation: np.ndarray = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return rotation


def asymmetric_phantom(shape: tuple[int, int, int] = (40, 48, 36)) -> tuple[np.ndarray, np.ndarray]:
    """A RAS-ordered test volume whose every flip and permutation is detectable.

    Parameters
    ----------
    shape
        RAS array shape; use three different sizes so that permutations show.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        ``(image, labels)``: a float32 ellipsoid "body" (100) with a bright blob (400, label 1)
        towards right-anterior-superior and a dimmer, smaller blob (250, label 2) towards
        left-posterior-inferior (see ``MARKER_FRACTIONS``); labels are uint8.
    """
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    extent = np.asarray(shape, dtype=np.float64).reshape(3, 1, 1, 1)
    centred = (grid - (extent - 1) / 2) / (extent / 2)
    image = np.where(np.sum(centred**2, axis=0) <= 0.9, 100.0, 0.0)
    labels = np.zeros(shape, dtype=np.uint8)
    for label, radius, value in ((1, 0.12, 400.0), (2, 0.08, 250.0)):
        centre = (np.asarray(MARKER_FRACTIONS[label]).reshape(3, 1, 1, 1)) * (extent - 1)
        inside = np.sum(((grid - centre) / extent) ** 2, axis=0) <= radius**2
        image[inside] = value
        labels[inside] = label
    return image.astype(np.float32), labels


def _ras_axis_and_sign(direction_lps: np.ndarray) -> tuple[int, int]:
    direction_ras = direction_lps * np.array([-1.0, -1.0, 1.0])
    axis = int(np.argmax(np.abs(direction_ras)))
    if not np.isclose(abs(direction_ras[axis]), 1.0):
        raise ValueError(f"direction {direction_lps} is not along a patient axis")
    return axis, int(np.sign(direction_ras[axis]))


def _stored_values(
    array: np.ndarray, slope: float, intercept: float
) -> tuple[np.ndarray, int]:
    stored = np.round((np.asarray(array, dtype=np.float64) - intercept) / slope)
    if stored.min() >= 0 and stored.max() <= 65535:
        return stored.astype(np.uint16), 0
    if stored.min() >= -32768 and stored.max() <= 32767:
        return stored.astype(np.int16), 1
    raise ValueError("values do not fit 16 bits with this RescaleSlope/RescaleIntercept")


def series_from_ras_volume(
    array_ras: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    modality: str = "MR",
    orientation: str = "axial",
    origin_mm: Sequence[float] = (-20.0, -30.0, -10.0),
    study_uid: str | None = None,
    series_description: str = "Synthetic T1",
    series_number: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    scramble_instance_numbers: bool = False,
    rescale_slope: float | None = None,
    rescale_intercept: float | None = None,
    patient_id: str = "SYNTH-0001",
    patient_name: str = "Synthetic^Patient",
) -> list[Dataset]:
    """Write a RAS-ordered volume (like an MSD NIfTI array) as a single-frame DICOM series.

    Voxel ``(i, j, k)`` of ``array_ras`` lies at RAS ``origin_mm + spacing_mm * (i, j, k)``
    (the NIfTI convention with a positive diagonal affine); the series shows the same voxels
    acquired in ``orientation``, with ImageOrientationPatient and ImagePositionPatient in LPS.

    Parameters
    ----------
    array_ras
        3D array, axes pointing to right, anterior, superior.
    spacing_mm
        Voxel size along the RAS axes.
    modality
        ``"MR"`` (MR Image Storage) or ``"CT"`` (CT Image Storage).
    orientation
        ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique-ish"`` (axial rotated by
        ``OBLIQUE_DEG`` about an oblique axis).
    origin_mm
        RAS position of voxel ``(0, 0, 0)``.
    study_uid
        StudyInstanceUID; derived from ``seed`` when ``None``.
    series_description, series_number, patient_id, patient_name
        Written as given.
    seed
        Makes every UID (and the shuffle) deterministic.
    shuffle
        Return the images in a random order rather than along the slice normal.
    scramble_instance_numbers
        Number the images in a random order, so that sorting by InstanceNumber is wrong.
    rescale_slope, rescale_intercept
        Stored value = (value - intercept) / slope, rounded; defaults are slope 1 and
        intercept -1024 for CT, none (identity, attributes omitted) for MR.

    Returns
    -------
    list[Dataset]
        One dataset per slice with file meta (explicit VR little endian), ready for
        :func:`write_datasets` or ``inference.volume.load_series``.

    Raises
    ------
    ValueError
        For an unknown modality or orientation, or values that do not fit 16 bits.
    """
    if modality not in ("MR", "CT") or orientation not in ORIENTATIONS:
        raise ValueError(f"unsupported modality {modality!r} or orientation {orientation!r}")
    array_ras = np.asarray(array_ras)
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    row_cosine, column_cosine = (np.asarray(v) for v in ORIENTATIONS[orientation])
    normal = np.cross(row_cosine, column_cosine)
    # DICOM array axes (slice, row, column) follow normal, column cosine, row cosine.
    axes_signs = [_ras_axis_and_sign(d) for d in (normal, column_cosine, row_cosine)]
    array_kji = np.transpose(array_ras, [axis for axis, _ in axes_signs])
    for dicom_axis, (_, sign) in enumerate(axes_signs):
        if sign < 0:
            array_kji = np.flip(array_kji, dicom_axis)
    # Affine from DICOM index to LPS, written out rather than taken from nibabel.
    affine = np.eye(4)
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    origin_index = np.zeros(3)
    for dicom_axis, (axis, sign) in enumerate(axes_signs):
        affine[:3, dicom_axis] = 0.0
        affine[axis, dicom_axis] = sign * spacing[axis] * ras_to_lps[axis]
        if sign < 0:
            origin_index[axis] = array_ras.shape[axis] - 1
    affine[:3, 3] = ras_to_lps * (np.asarray(origin_mm) + spacing * origin_index)
    if orientation == "oblique-ish":
        centre = affine @ np.array([*(np.asarray(array_kji.shape) - 1) / 2, 1.0])
        rotate = np.eye(4)
        rotate[:3, :3] = _rotation(OBLIQUE_AXIS, OBLIQUE_DEG)
        rotate[:3, 3] = centre[:3] - rotate[:3, :3] @ centre[:3]
        affine = rotate @ affine
    slope = 1.0 if rescale_slope is None else float(rescale_slope)
    intercept = (
        float(rescale_intercept)
        if rescale_intercept is not None
        else (-1024.0 if modality == "CT" else 0.0)
    )
    stored, pixel_representation = _stored_values(array_kji, slope, intercept)
    write_rescale = modality == "CT" or rescale_slope is not None or rescale_intercept is not None

    study_uid = study_uid or generate_uid(entropy_srcs=[str(seed), "study"])
    series_uid = generate_uid(
        entropy_srcs=[str(seed), study_uid, series_description, str(series_number), orientation]
    )
    frame_uid = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    rng = np.random.default_rng(seed)
    n_slices = array_kji.shape[0]
    instance_numbers = rng.permutation(n_slices) + 1 if scramble_instance_numbers else None
    pixel_spacing = [float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 2]))]
    slice_spacing = float(np.linalg.norm(affine[:3, 0]))
    iop = [*(affine[:3, 2] / pixel_spacing[1]), *(affine[:3, 1] / pixel_spacing[0])]
    today = datetime.date(2024, 1, 15)
    sop_class_uid = MRImageStorage if modality == "MR" else CTImageStorage
    little_endian = stored.dtype.newbyteorder("<")

    datasets = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = sop_class_uid
        ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = f"ACC{seed:05d}"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic study"
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "dicom-node tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in (affine @ [k, 0, 0, 1])[:3]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
        ds.PixelSpacing = [round(v, 6) for v in pixel_spacing]
        ds.SliceThickness = round(slice_spacing, 6)
        ds.SliceLocation = round(float(np.dot(ds.ImagePositionPatient, normal)), 6)
        if modality == "MR":
            ds.SpacingBetweenSlices = round(slice_spacing, 6)
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = 8.0
            ds.EchoTime = 3.0
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = 3.0
        else:
            ds.KVP = 120
            ds.AcquisitionNumber = 1
        if write_rescale:
            ds.RescaleIntercept = intercept
            ds.RescaleSlope = slope
            if modality == "CT":
                ds.RescaleType = "HU"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        ds.PixelData = np.ascontiguousarray(stored[k], dtype=little_endian).tobytes()
        datasets.append(ds)
    if shuffle:
        datasets = [datasets[i] for i in rng.permutation(n_slices)]
    return datasets


class SeriesOptions(TypedDict, total=False):
    """Keyword options of :func:`series_from_ras_volume` that :func:`series_from_nifti` passes on."""

    modality: str
    orientation: str
    study_uid: str | None
    series_description: str
    series_number: int
    seed: int
    shuffle: bool
    scramble_instance_numbers: bool
    rescale_slope: float | None
    rescale_intercept: float | None
    patient_id: str
    patient_name: str


def series_from_nifti(path: Path, **kwargs: Unpack[SeriesOptions]) -> list[Dataset]:
    """Write a NIfTI image as a DICOM series via :func:`series_from_ras_volume`.

    The image is first brought to the closest RAS orientation (``as_closest_canonical``);
    its zooms become the spacing and its origin the RAS position of voxel ``(0, 0, 0)``.
    """
    image = nib.as_closest_canonical(nib.load(path))
    return series_from_ras_volume(
        np.asarray(image.dataobj),
        tuple(float(z) for z in image.header.get_zooms()[:3]),
        origin_mm=tuple(float(v) for v in image.affine[:3, 3]),
        **kwargs,
    )


def write_datasets(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write datasets as DICOM Part 10 files named by their list position.

    Parameters
    ----------
    datasets
        Datasets with file meta, such as from :func:`series_from_ras_volume`.
    folder
        Created if needed.

    Returns
    -------
    list[Path]
        The written files, in the order of ``datasets``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def study_of_patient(
    series_dir: Path, folder: Path, *, patient_id: str, patient_name: str, study_date: str, seed: str
) -> list[Path]:
    """Copy a real series as a new study of another patient on another date.

    Study, series and instance UIDs are derived from ``seed`` (so two copies of one series are
    two studies), the patient's ID, name and the study date are replaced; pixels stay as they are.

    Returns
    -------
    list[Path]
        The written files, one per instance.
    """
    from pydicom.uid import generate_uid

    study_uid = generate_uid(entropy_srcs=[seed, "study"])
    series_uid = generate_uid(entropy_srcs=[seed, "series"])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, path in enumerate(sorted(series_dir.glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[seed, str(path.name)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"ACC{seed[-6:]}"
        paths.append(folder / f"{k:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths
