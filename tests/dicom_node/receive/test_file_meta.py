"""The file meta information the SCP writes before each received data set, against pydicom's encoding."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_node.receive.scp import file_meta_bytes

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.826.0.1.3680043.8.498.12345678901"])
@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless])
def test_the_same_bytes_as_pynetdicoms_file_meta(sop_instance_uid: str, transfer_syntax: UID) -> None:
    # odd and even UID lengths: UIs are padded with NUL to an even length
    expected = encode_file_meta(create_file_meta(
        sop_class_uid=UID(CT_IMAGE), sop_instance_uid=UID(sop_instance_uid), transfer_syntax=transfer_syntax))
    written = file_meta_bytes(CT_IMAGE, sop_instance_uid, str(transfer_syntax))
    assert written[:132] == b"\x00" * 128 + b"DICM"
    assert written[132:] == expected
    read = pydicom.dcmread(io.BytesIO(written)).file_meta
    assert read.MediaStorageSOPInstanceUID == sop_instance_uid
    assert read.TransferSyntaxUID == transfer_syntax
