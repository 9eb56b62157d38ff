"""DICOM to HDF5 and back: in memory for tasks, through files for the convert command."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest

from offline.hdf5 import ConversionError, load_dicom_series, read_hdf5, to_dicom, to_hdf5, volume_to_bytes
from tests.conftest import HIPPO_CROP_STUDY1


def test_round_trip_keeps_values_geometry_and_uids(tmp_path: Path) -> None:
    volume = to_hdf5(HIPPO_CROP_STUDY1, tmp_path / "v.h5", tmp_path / "v.json")
    again = read_hdf5(BytesIO(volume_to_bytes(volume)))  # no temporary file
    assert np.array_equal(again.array, volume.array) and again.sop_instance_uids == volume.sop_instance_uids
    header = json.loads((tmp_path / "v.json").read_text())
    assert header["series"]["SeriesInstanceUID"] == volume.series_instance_uid
    assert [s["SOPInstanceUID"] for s in header["slices"]] == list(volume.sop_instance_uids)
    paths = to_dicom(tmp_path / "v.h5", HIPPO_CROP_STUDY1, tmp_path / "out")
    written, _ = load_dicom_series(tmp_path / "out")
    assert np.array_equal(written.array, volume.array)
    np.testing.assert_allclose(written.affine, volume.affine)
    first = pydicom.dcmread(paths[0])
    assert first.SeriesInstanceUID != volume.series_instance_uid and first.ImageType[0] == "DERIVED"


def test_a_volume_that_does_not_fit_the_template_is_refused(tmp_path: Path) -> None:
    volume = to_hdf5(HIPPO_CROP_STUDY1, tmp_path / "v.h5", tmp_path / "v.json")
    import h5py

    with h5py.File(tmp_path / "v.h5", "r+") as h5:
        del h5["volume"]
        h5["volume"] = np.zeros((volume.shape[0], 4, 4), dtype=np.float32)
    with pytest.raises(ConversionError, match="differs from the template"):
        to_dicom(tmp_path / "v.h5", HIPPO_CROP_STUDY1, tmp_path / "out")


def test_one_template_image_is_enough(tmp_path: Path) -> None:
    volume = to_hdf5(HIPPO_CROP_STUDY1, tmp_path / "v.h5", tmp_path / "v.json")
    template = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[5]
    paths = to_dicom(tmp_path / "v.h5", template, tmp_path / "out")
    assert len(paths) == volume.shape[0] == 32
    written, images = load_dicom_series(tmp_path / "out")
    assert np.array_equal(written.array, volume.array)
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-4)  # geometry from the HDF5, not the template
    source = pydicom.dcmread(template)
    assert {str(ds.StudyInstanceUID) for ds in images} == {str(source.StudyInstanceUID)}
    assert len({ds.SOPInstanceUID for ds in images}) == 32
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in images] == list(volume.sop_instance_uids)
    to_dicom(tmp_path / "v.h5", HIPPO_CROP_STUDY1, tmp_path / "from-series")
    assert np.array_equal(load_dicom_series(tmp_path / "from-series")[0].array, written.array)


def test_a_template_image_of_another_matrix_is_refused(tmp_path: Path) -> None:
    to_hdf5(HIPPO_CROP_STUDY1, tmp_path / "v.h5", tmp_path / "v.json")
    other = next((HIPPO_CROP_STUDY1.parent / "12-T1post-05670").iterdir())
    with pytest.raises(ConversionError, match="template image is 512x512, the volume's slices are"):
        to_dicom(tmp_path / "v.h5", other, tmp_path / "out")
    with pytest.raises(ConversionError, match="no such template"):
        to_dicom(tmp_path / "v.h5", tmp_path / "missing.dcm", tmp_path / "out")
