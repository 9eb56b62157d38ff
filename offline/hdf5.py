"""DICOM series to HDF5 (volume, LPS geometry, UIDs) plus a JSON header, and HDF5 back to a derived series."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import IO, Any

import h5py
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node import __version__
from dicom_node.receive.files import iter_files
from dicom_node.run.pipeline import order_like_volume, read_datasets
from dicom_node.receive.spool import write_atomic
from dicom_node.uids import result_uid
from inference.errors import InputError
from inference.volume import Volume, load_series
from reports.derived import build_derived_series
from reports.identity import STUDY_ATTRIBUTES, Identity

logger = logging.getLogger(__name__)

FORMAT = "dicom-node-volume"
FORMAT_VERSION = 1
#: Largest difference (mm) between an HDF5 affine and the template's still taken as the same grid.
AFFINE_TOLERANCE_MM = 1e-3
#: Series-level header fields written to the JSON sidecar (and needed to write a series back).
SERIES_FIELDS = (
    "Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "FrameOfReferenceUID",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "Rows",
    "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "WindowCenter", "WindowWidth", "SOPClassUID",
)
SLICE_FIELDS = ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient")


class ConversionError(ValueError):
    """A conversion cannot be done; the message says why (shape, geometry, unreadable input)."""


def write_hdf5(volume: Volume, target: str | Path | IO[bytes]) -> None:
    """Write a volume to HDF5: ``volume`` (float32, slice/row/column), ``affine_lps``, ``spacing_mm``, UIDs.

    ``target`` may be a path or a binary file object (``BytesIO``: no temporary file).
    """
    with h5py.File(target, "w") as h5:
        h5.attrs["format"] = FORMAT
        h5.attrs["format_version"] = FORMAT_VERSION
        h5.attrs["axes"] = "slice,row,column"
        h5.attrs["series_instance_uid"] = volume.series_instance_uid
        h5.attrs["modality"] = volume.modality
        h5.attrs["written_by"] = f"dicom-node {__version__}"
        h5.create_dataset("volume", data=volume.array, compression="gzip", compression_opts=4)
        h5.create_dataset("affine_lps", data=np.asarray(volume.affine))
        h5.create_dataset("spacing_mm", data=np.asarray(volume.spacing_mm))
        h5.create_dataset("sop_instance_uids", data=list(volume.sop_instance_uids),
                          dtype=h5py.string_dtype())


def read_hdf5(source: str | Path | IO[bytes]) -> Volume:
    """Read a volume written by :func:`write_hdf5` (or any HDF5 with the same datasets).

    Raises
    ------
    ConversionError
        If a dataset is missing or the parts do not fit together.
    """
    try:
        with h5py.File(source, "r") as h5:
            array = np.asarray(h5["volume"][()], dtype=np.float32)
            affine = np.asarray(h5["affine_lps"][()], dtype=np.float64)
            uids = tuple(u.decode() if isinstance(u, bytes) else str(u) for u in h5["sop_instance_uids"][()])
            series_uid = str(h5.attrs.get("series_instance_uid", ""))
            modality = str(h5.attrs.get("modality", ""))
    except (KeyError, OSError) as exc:
        raise ConversionError(f"not a dicom-node HDF5 volume: {exc}") from exc
    try:
        return Volume(array, affine, uids, series_uid, modality)
    except ValueError as exc:
        raise ConversionError(f"HDF5 volume is inconsistent: {exc}") from exc


def volume_to_bytes(volume: Volume) -> bytes:
    """Return the HDF5 file of a volume as bytes, built in memory."""
    buffer = BytesIO()
    write_hdf5(volume, buffer)
    return buffer.getvalue()


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return str(value)


def header_fields(sources: Sequence[Dataset]) -> dict[str, Any]:
    """Return the header fields of a series (sources in volume order) as JSON-able data."""
    first = sources[0]

    def pick(ds: Dataset, keys: Sequence[str]) -> dict[str, Any]:
        return {k: _json_value(ds.get(k)) for k in keys if k in ds}

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "study": pick(first, STUDY_ATTRIBUTES),
        "series": pick(first, SERIES_FIELDS),
        "slices": [pick(ds, SLICE_FIELDS) for ds in sources],
    }


def load_dicom_series(folder: Path) -> tuple[Volume, list[Dataset]]:
    """Read one series from a folder; return its volume and the datasets in volume order.

    Raises
    ------
    ConversionError
        If the folder holds no DICOM, several series, or a series that is not a volume.
    """
    paths = list(iter_files(folder))
    if not paths:
        raise ConversionError(f"{folder}: no files")
    try:
        datasets = read_datasets(paths)
        series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
        if len(series) != 1:
            raise ConversionError(f"{folder}: {len(series)} series; give a folder with one series")
        volume = load_series(datasets)
    except (InputError, ValueError) as exc:
        raise ConversionError(f"{folder}: {exc}") from exc
    except Exception as exc:  # StudyNotProcessable from read_datasets
        raise ConversionError(f"{folder}: {exc}") from exc
    return volume, order_like_volume(datasets, volume)


def to_hdf5(dicom_dir: Path, out_h5: Path, out_json: Path) -> Volume:
    """Convert a DICOM series folder to an HDF5 volume and a JSON header; return the volume."""
    volume, sources = load_dicom_series(dicom_dir)
    write_atomic(out_h5, volume_to_bytes(volume))
    write_atomic(out_json, json.dumps(header_fields(sources), indent=2).encode())
    logger.info("wrote %s %s and %s", out_h5, volume.shape, out_json)
    return volume


def derived_from_volume(
    volume: Volume, template: Volume, sources: Sequence[Dataset], *, series_description: str,
    series_number: int, derivation: str, identity: Identity, uid_seed: str,
) -> list[Dataset]:
    """Build a derived series holding ``volume`` over the template series' geometry.

    Raises
    ------
    ConversionError
        If the volume's shape or affine differs from the template's.
    """
    if volume.shape != template.shape:
        raise ConversionError(f"volume shape {volume.shape} differs from the template's {template.shape}")
    if not np.allclose(volume.affine, template.affine, atol=AFFINE_TOLERANCE_MM):
        raise ConversionError("volume geometry (affine_lps) differs from the template series")
    base = (str(sources[0].StudyInstanceUID), template.series_instance_uid, "hdf5", uid_seed)
    return build_derived_series(
        sources, volume.array.astype(np.float64),
        series_instance_uid=result_uid(*base, "series"),
        sop_instance_uids=[result_uid(*base, "instance", str(k)) for k in range(len(sources))],
        series_number=series_number, series_description=series_description,
        derivation_description=derivation, identity=identity,
    )


def sources_from_template_file(template: Dataset, volume: Volume) -> list[Dataset]:
    """Return one header per slice of ``volume``, made from one template image and the volume's geometry.

    Each copy of the template gets the slice's ImagePositionPatient, the volume's
    ImageOrientationPatient and PixelSpacing (from its LPS affine), an InstanceNumber and
    the SOP Instance UID the volume recorded for that slice (the image it came from).

    Raises
    ------
    ConversionError
        If the template's matrix differs from the volume's slices.
    """
    if (int(template.get("Rows", 0)), int(template.get("Columns", 0))) != volume.shape[1:]:
        raise ConversionError(f"template image is {template.get('Rows')}x{template.get('Columns')}, "
                              f"the volume's slices are {volume.shape[1]}x{volume.shape[2]}")
    affine = np.asarray(volume.affine)
    column_step, row_step = affine[:3, 1], affine[:3, 2]  # moving down a column, along a row
    orientation = [*(row_step / np.linalg.norm(row_step)), *(column_step / np.linalg.norm(column_step))]
    header = Dataset()
    for element in template:
        if element.keyword not in ("PixelData", "SliceLocation"):
            header.add(element)
    header.file_meta = template.file_meta
    sources = []
    for k, sop_uid in enumerate(volume.sop_instance_uids):
        ds = copy.deepcopy(header)
        ds.ImagePositionPatient = [round(float(v), 6) for v in affine[:3, 3] + k * affine[:3, 0]]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
        ds.PixelSpacing = [round(float(np.linalg.norm(column_step)), 6), round(float(np.linalg.norm(row_step)), 6)]
        if "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = round(float(np.linalg.norm(affine[:3, 0])), 6)
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = sop_uid
        sources.append(ds)
    return sources


def to_dicom(
    in_h5: Path, template: Path, out_dir: Path, *, series_description: str = "From HDF5",
    series_number: int = 9905,
) -> list[Path]:
    """Write an HDF5 volume as a new series using a template for the headers.

    Parameters
    ----------
    in_h5
        The volume (:func:`write_hdf5`).
    template
        A folder with the template series (its geometry must be the volume's), or one
        template image whose headers are repeated on every slice with the volume's geometry.
    out_dir
        Where the images are written (created).
    series_description, series_number
        Of the new series.

    Returns
    -------
    list[pathlib.Path]
        The files written, one per slice, in volume order.

    Raises
    ------
    ConversionError
        If an input cannot be read or the volume does not fit the template.
    """
    data = in_h5.read_bytes()
    volume = read_hdf5(BytesIO(data))
    if template.is_file():
        try:
            template_ds = pydicom.dcmread(template)
        except (InvalidDicomError, OSError, ValueError) as exc:
            raise ConversionError(f"{template}: not a readable DICOM file: {exc}") from exc
        sources = sources_from_template_file(template_ds, volume)
        template_volume = Volume(volume.array, volume.affine, volume.sop_instance_uids,
                                 str(template_ds.get("SeriesInstanceUID", "")), volume.modality)
    elif template.is_dir():
        template_volume, sources = load_dicom_series(template)
    else:
        raise ConversionError(f"{template}: no such template file or folder")
    identity = Identity(manufacturer_model_name="dicom-node", software_versions=__version__,
                        device_serial_number="convert", algorithm_name="to-dicom",
                        algorithm_version=__version__)
    images = derived_from_volume(
        volume, template_volume, sources, series_description=series_description, series_number=series_number,
        derivation=f"volume from {in_h5.name} written over the template series", identity=identity,
        uid_seed=hashlib.sha256(data).hexdigest(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(images):
        path = out_dir / f"{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    logger.info("wrote %d images of series %s to %s", len(paths), images[0].SeriesInstanceUID, out_dir)
    return paths


__all__ = ["ConversionError", "derived_from_volume", "header_fields", "read_hdf5", "sources_from_template_file",
           "to_dicom",
           "to_hdf5", "volume_to_bytes", "write_hdf5"]
