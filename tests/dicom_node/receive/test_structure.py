"""The structural walk of received data sets: real instances of every syntax pass, broken ones are refused."""

from __future__ import annotations

import random
import struct
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
import pydicom.data
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from dicom_node import status
from dicom_node.errors import RejectedInstance
from dicom_node.receive.structure import check_structure, expected_pixel_bytes
from tests.conftest import HIPPO_CROP_STUDY1, SHARED_DATA

EDGE = SHARED_DATA / "edge-cases" / "generic"
#: pydicom's bundled test files, by path: asking pydicom for one it does not bundle downloads it.
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"


def get_testdata_file(name: str) -> Path:
    return PYDICOM_FILES / name


def data_set_of(path: Path | str) -> tuple[bytes, UID]:
    """The encoded data set of a Part 10 file, as a C-STORE would carry it, and its syntax."""
    raw = Path(path).read_bytes()
    fp = BytesIO(raw)
    fp.seek(132)
    meta = _read_file_meta_info(fp)
    return raw[fp.tell():], UID(meta.TransferSyntaxUID)


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def refusal(data: bytes, syntax: UID, sop_class_uid: str | None = None) -> str:
    with pytest.raises(RejectedInstance) as info:
        check_structure(data, syntax, sop_class_uid)
    assert info.value.status == status.CANNOT_UNDERSTAND
    assert len(info.value.reason) <= 64  # it fits an ErrorComment (LO)
    return info.value.reason


def mr_instance() -> Dataset:
    return pydicom.dcmread(sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[0])


def pixel_offset(data: bytes, little: bool = True) -> int:
    return data.index(b"\xe0\x7f\x10\x00" if little else b"\x7f\xe0\x00\x10")


REAL_FILES = [
    *sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:2],
    *(next(p for p in sorted((EDGE / name).rglob("*")) if p.is_file())
      for name in ("compressed_j2k", "compressed_jpegls", "compressed_rle")),
    *(get_testdata_file(name) for name in (
        "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
        "SC_rgb_rle_2frame.dcm", "SC_ybr_full_422_uncompressed.dcm", "rtplan.dcm",
    )),
]


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: Path(p).name)
def test_real_instances_of_every_syntax_pass(path: Path) -> None:
    data, syntax = data_set_of(path)
    check_structure(data, syntax)
    check_structure(memoryview(data), syntax)


def test_syntaxes_covered() -> None:
    syntaxes = {data_set_of(p)[1] for p in REAL_FILES}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian, JPEG2000Lossless} <= syntaxes


def test_implicit_body_on_an_explicit_context_is_refused() -> None:
    data = encode(mr_instance(), implicit=True)
    check_structure(data, ImplicitVRLittleEndian)
    assert "no valid VR" in refusal(data, ExplicitVRLittleEndian)


def test_explicit_body_on_an_implicit_context_is_refused() -> None:
    data = encode(mr_instance())
    refusal(data, ImplicitVRLittleEndian)


def test_pixel_data_declaring_200_mb_with_1_kb_sent_is_refused() -> None:
    data = encode(mr_instance())
    cut = pixel_offset(data)
    bad = data[:cut] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 200_000_000) + bytes(1024)
    assert refusal(bad, ExplicitVRLittleEndian) == (
        "truncated: (7FE0,0010) length 200000000, 1024 bytes left")


def test_random_bytes_after_the_pixel_data_are_refused() -> None:
    data = encode(mr_instance())
    rng = random.Random(7)
    for _ in range(50):
        tail = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4000)))
        # a tag at or past group 0x7FE0, then noise: what the header-only read let through
        refusal(data + b"\xe0\x7f\x11\x00" + tail, ExplicitVRLittleEndian)


def test_short_native_pixel_data_is_refused() -> None:
    ds = mr_instance()
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    expected = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    reason = refusal(encode(ds), ExplicitVRLittleEndian)
    assert reason == f"Pixel Data is {len(ds.PixelData)} bytes, its attributes imply {expected}"


def test_missing_pixel_data_is_refused() -> None:
    ds = mr_instance()
    del ds.PixelData
    assert refusal(encode(ds), ExplicitVRLittleEndian).startswith("Pixel Data missing")
    del ds.Rows
    check_structure(encode(ds), ExplicitVRLittleEndian)  # not known to be an image
    assert refusal(encode(ds), ExplicitVRLittleEndian, ds.SOPClassUID) == (
        "Pixel Data missing from a MR Image Storage")


def test_every_truncation_is_refused() -> None:
    """Generated: images cut at many points (pixel data is their last element)."""
    mr = mr_instance().SOPClassUID
    for syntax, data in ((ExplicitVRLittleEndian, encode(mr_instance())),
                         (ImplicitVRLittleEndian, encode(mr_instance(), implicit=True)),
                         (ExplicitVRBigEndian, data_set_of(get_testdata_file("MR_small_bigendian.dcm"))[0])):
        for cut in range(1, len(data), 97):
            refusal(data[:cut], syntax, mr)


def test_every_truncation_of_encapsulated_pixel_data_is_refused() -> None:
    path = next(p for p in sorted((EDGE / "compressed_j2k").rglob("*")) if p.is_file())
    data, syntax = data_set_of(path)
    start = pixel_offset(data)
    for cut in range(1, len(data), max(1, len(data) // 300)):
        refusal(data[:cut], syntax, pydicom.dcmread(path).SOPClassUID)


def test_encapsulated_pixel_data_faults_are_named() -> None:
    path = next(p for p in sorted((EDGE / "compressed_rle").rglob("*")) if p.is_file())
    data, syntax = data_set_of(path)
    start = pixel_offset(data)
    header = data[:start] + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
    table = b"\xfe\xff\x00\xe0" + struct.pack("<I", 0)
    fragment = b"\xfe\xff\x00\xe0" + struct.pack("<I", 4) + b"abcd"
    end = b"\xfe\xff\xdd\xe0" + struct.pack("<I", 0)
    check_structure(header + table + fragment + end, syntax)
    assert "without fragments" in refusal(header + table + end, syntax)
    assert "not a multiple of 4" in refusal(
        header + b"\xfe\xff\x00\xe0" + struct.pack("<I", 3) + b"abc" + fragment + end, syntax)
    assert "instead of a fragment" in refusal(header + table + b"\x08\x00\x18\x00" + bytes(4), syntax)
    native = data[:start] + b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", 4) + b"abcd"
    assert "native but the transfer syntax is encapsulated" in refusal(native, syntax)


def test_undefined_length_sequences_are_walked() -> None:
    ds = mr_instance()
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.ReferencedImageSequence = [item, item]
    data = encode(ds)
    seq_tag = b"\x08\x00\x40\x11SQ\x00\x00"  # (0008,1140)
    at = data.index(seq_tag)
    length = struct.unpack_from("<I", data, at + 8)[0]
    items = data[at + 12:at + 12 + length]
    # re-encode the sequence and its items with undefined lengths and delimiters
    undefined_items = b""
    pos = 0
    while pos < len(items):
        item_length = struct.unpack_from("<I", items, pos + 4)[0]
        undefined_items += (b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + items[pos + 8:pos + 8 + item_length]
                            + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00")
        pos += 8 + item_length
    sequence = seq_tag + b"\xff\xff\xff\xff" + undefined_items + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    good = data[:at] + sequence + data[at + 12 + length:]
    check_structure(good, ExplicitVRLittleEndian)
    without_delimiter = data[:at] + seq_tag + b"\xff\xff\xff\xff" + undefined_items
    refusal(without_delimiter, ExplicitVRLittleEndian)
    unclosed_item = data[:at] + seq_tag + b"\xff\xff\xff\xff" + undefined_items[:-8]
    assert "without delimiter" in refusal(unclosed_item, ExplicitVRLittleEndian)


def test_elements_out_of_order_are_refused() -> None:
    ds = Dataset()
    ds.PatientName = "A"
    ds.StudyInstanceUID = "1.2.3"
    data = encode(ds)
    half = data.index(b"\x20\x00\x0d\x00")
    assert "out of order" in refusal(data[half:] + data[:half], ExplicitVRLittleEndian)


def test_deflated_data_sets_are_inflated_and_walked() -> None:
    data, syntax = data_set_of(get_testdata_file("image_dfl.dcm"))
    check_structure(data, syntax)
    assert refusal(data[: len(data) // 2], syntax) == "deflated data set is truncated"
    assert refusal(b"\x00\x01garbage", syntax).startswith("deflated data set cannot be inflated")
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    implicit = deflater.compress(encode(mr_instance(), implicit=True)) + deflater.flush()
    assert "no valid VR" in refusal(implicit, syntax)


def test_empty_data_set_is_refused() -> None:
    assert refusal(b"", ExplicitVRLittleEndian) == "the data set is empty"


def test_expected_pixel_bytes() -> None:
    assert expected_pixel_bytes(512, 512, 1, 16, 1) == 524288
    assert expected_pixel_bytes(3, 3, 1, 1, 1) == 2  # bit-packed, rounded up
    assert expected_pixel_bytes(100, 100, 3, 8, 2, subsampled_422=True) == 40000
