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
