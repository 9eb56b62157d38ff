"""Check that received bytes form one complete data set of their transfer syntax, without decoding pixels."""

from __future__ import annotations

import struct
import zlib

from pydicom.uid import UID

from dicom_node import status
from dicom_node.errors import RejectedInstance

__all__ = ["check_structure", "data_set_offset", "expected_pixel_bytes"]

#: A length of 0xFFFFFFFF: the value ends with a delimiter (PS3.5 7.1.1).
UNDEFINED_LENGTH = 0xFFFFFFFF

#: Explicit VRs whose header has 2 reserved bytes and a 32-bit length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    vr.encode() for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
#: Explicit VRs with a 16-bit length.
_SHORT_VRS = frozenset(
    vr.encode() for vr in (
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL",
        "SS", "ST", "TM", "UI", "UL", "US",
    )
)

_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_FLOAT_PIXEL_DATA = 0x7FE00008
_DOUBLE_PIXEL_DATA = 0x7FE00009

#: Top-level attributes whose values say how long native pixel data must be (PS3.3 C.7.6.3).
_SAMPLES_PER_PIXEL = 0x00280002
_NUMBER_OF_FRAMES = 0x00280008
_ROWS = 0x00280010
_COLUMNS = 0x00280011
_BITS_ALLOCATED = 0x00280100
_PHOTOMETRIC_INTERPRETATION = 0x00280004
_IMAGE_TAGS = frozenset({_SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES, _ROWS, _COLUMNS, _BITS_ALLOCATED,
                         _PHOTOMETRIC_INTERPRETATION})

#: Sequences and items may nest; a data set deeper than this is refused rather than recursed into.
_MAX_DEPTH = 64


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _refuse(reason: str) -> RejectedInstance:
    return RejectedInstance(status.CANNOT_UNDERSTAND, reason)


class _Walker:
    """Walks elements of one encoding (VR explicit or implicit, byte order) over a buffer."""

    def __init__(self, data: bytes | memoryview, *, implicit: bool, little_endian: bool) -> None:
        self.data = data
        self.implicit = implicit
        order = "<" if little_endian else ">"
        self.little_endian = little_endian
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "I")
        #: Raw values of the top-level image attributes met on the way.
        self.image_values: dict[int, bytes] = {}
        #: Top-level Pixel Data: (offset of its value, length as declared).
        self.pixel_data: tuple[int, int] | None = None
        self.has_float_pixel_data = False

    def header(self, pos: int, end: int) -> tuple[int, bytes | None, int, int]:
        """Return (tag, VR or None, value length, value offset) of the element at ``pos``."""
        if end - pos < 8:
            raise _refuse(f"{end - pos} stray byte(s) at offset {pos}, no element")
        group, element = self._tag.unpack_from(self.data, pos)
        tag = group << 16 | element
        if group == 0xFFFE or self.implicit:  # items and delimiters never have a VR
            return tag, None, self._u32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4:pos + 6])
        if vr in _SHORT_VRS:
            return tag, vr, self._u16.unpack_from(self.data, pos + 6)[0], pos + 8
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise _refuse(f"truncated: {_tag_text(tag)} at offset {pos} is cut off")
            return tag, vr, self._u32.unpack_from(self.data, pos + 8)[0], pos + 12
        raise _refuse(f"{_tag_text(tag)} at offset {pos}: no valid VR ({vr.hex(' ')}), "
                      f"not explicit {'LE' if self.little_endian else 'BE'}")

    def item_header(self, pos: int, end: int) -> tuple[int, int, int]:
        """Return (tag, length, value offset) of the item or delimiter that must be at ``pos``."""
        if end - pos < 8:
            raise _refuse(f"{end - pos} stray byte(s) at offset {pos}, no item")
        group, element = self._tag.unpack_from(self.data, pos)
        return group << 16 | element, self._u32.unpack_from(self.data, pos + 4)[0], pos + 8

    def walk_data_set(self, pos: int, end: int, *, depth: int, until_delimiter: bool) -> int:
        """Walk the elements from ``pos``; return where the data set (or its item) ends.

        With ``until_delimiter`` the data set is an undefined-length item that ends with an
        Item Delimitation Item; otherwise it fills ``[pos, end)`` exactly.
        """
        if depth > _MAX_DEPTH:
            raise _refuse(f"sequences nested deeper than {_MAX_DEPTH} levels")
        previous = -1
        while pos < end:
            tag, vr, length, value = self.header(pos, end)
            if tag == _ITEM_DELIMITER and until_delimiter:
                if length != 0:
                    raise _refuse(f"item delimiter at offset {pos} has length {length}, not 0")
                return value
            if tag >> 16 == 0xFFFE:
                raise _refuse(f"unexpected {_tag_text(tag)} at offset {pos} inside a data set")
            if tag <= previous:
                raise _refuse(f"{_tag_text(tag)} at offset {pos} after {_tag_text(previous)}: "
                              "out of order")
            previous = tag
            pos = self.walk_value(tag, vr, length, value, end, depth=depth)
        if until_delimiter:
            raise _refuse("undefined-length item without delimiter (truncated)")
        return pos

    def walk_value(self, tag: int, vr: bytes | None, length: int, value: int, end: int,
                   *, depth: int) -> int:
        """Check one element's value; return the offset after it."""
        top = depth == 0
        if tag == _PIXEL_DATA and top:
            self.pixel_data = (value, length)
        elif tag in (_FLOAT_PIXEL_DATA, _DOUBLE_PIXEL_DATA) and top:
            self.has_float_pixel_data = True
        if length == UNDEFINED_LENGTH:
            if tag == _PIXEL_DATA and top and vr != b"UN":
                return self.walk_fragments(value, end)
            if not (vr is None or vr in (b"SQ", b"UN")):
                raise _refuse(f"{_tag_text(tag)} ({vr.decode()}) has an undefined length")
            if vr == b"UN":  # an implicit VR little endian sequence inside (PS3.5 6.2.2)
                inner = _Walker(self.data, implicit=True, little_endian=True)
                return inner.walk_sequence(value, end, depth=depth + 1)
            return self.walk_sequence(value, end, depth=depth + 1)
        stop = value + length
        if stop > end:
            raise _refuse(f"truncated: {_tag_text(tag)} length {length}, {end - value} bytes left")
        if top and tag in _IMAGE_TAGS:
            self.image_values[tag] = bytes(self.data[value:stop])
        return stop

    def walk_sequence(self, pos: int, end: int, *, depth: int) -> int:
        """Walk an undefined-length sequence's items up to its delimiter; return the offset after it."""
        while True:
            tag, length, value = self.item_header(pos, end)
            if tag == _SEQUENCE_DELIMITER:
                if length != 0:
                    raise _refuse(f"sequence delimiter at offset {pos} has length {length}, not 0")
                return value
            if tag != _ITEM:
                raise _refuse(f"{_tag_text(tag)} at offset {pos} instead of an item")
            if length == UNDEFINED_LENGTH:
                pos = self.walk_data_set(value, end, depth=depth, until_delimiter=True)
            elif value + length > end:
                raise _refuse(f"truncated: item at {pos} length {length}, {end - value} bytes left")
            else:
                pos = self.walk_data_set(value, value + length, depth=depth, until_delimiter=False)

    def walk_fragments(self, pos: int, end: int) -> int:
        """Walk encapsulated pixel data (PS3.5 A.4): offset table, fragments, delimiter."""
        fragments = 0
        while True:
            tag, length, value = self.item_header(pos, end)
            if tag == _SEQUENCE_DELIMITER:
                if length != 0:
                    raise _refuse(f"pixel data delimiter at offset {pos} has length {length}, not 0")
                if fragments < 2:
                    raise _refuse("encapsulated Pixel Data without fragments")
                return value
            if tag != _ITEM:
                raise _refuse(f"{_tag_text(tag)} at offset {pos} instead of a fragment")
            if length == UNDEFINED_LENGTH:
                raise _refuse(f"pixel data fragment at offset {pos} has an undefined length")
            if value + length > end:
                raise _refuse(f"truncated: fragment at {pos} length {length}, "
                              f"{end - value} bytes left")
            if fragments == 0 and length % 4:
                raise _refuse(f"basic offset table is {length} bytes, not a multiple of 4")
            fragments += 1
            pos = value + length

    def unsigned(self, tag: int) -> int | None:
        raw = self.image_values.get(tag)
        if raw is None or len(raw) < 2:
            return None
        return int(self._u16.unpack_from(raw, 0)[0])

    def frames(self) -> int:
        raw = self.image_values.get(_NUMBER_OF_FRAMES)
        if raw is None:
            return 1
        text = raw.decode("ascii", errors="replace").strip(" \x00")
        try:
            return max(int(text), 1) if text else 1
        except ValueError:
            raise _refuse(f"NumberOfFrames is not an integer ({text[:16]!r})") from None


def expected_pixel_bytes(rows: int, columns: int, samples: int, bits_allocated: int,
                         frames: int, *, subsampled_422: bool = False) -> int:
    """Return how many bytes native Pixel Data of these dimensions holds, before even padding.

    Bit-packed images (``BitsAllocated`` 1) are packed across frames (PS3.5 8.1.1);
    ``YBR_FULL_422`` stores two luminance and one pair of chroma samples per two pixels
    (PS3.3 C.7.6.3.1.2), two samples per pixel instead of three.
    """
    if subsampled_422 and samples == 3:
        samples = 2
    return (rows * columns * samples * frames * bits_allocated + 7) // 8


def _check_pixels_present(walker: _Walker, sop_class_uid: str | None) -> None:
    if walker.pixel_data is not None or walker.has_float_pixel_data:
        return
    if sop_class_uid is not None and "Image Storage" in UID(sop_class_uid).name:
        raise _refuse(f"Pixel Data missing from a {UID(sop_class_uid).name[:40]}")
    if walker.unsigned(_ROWS) and walker.unsigned(_COLUMNS) and walker.unsigned(_BITS_ALLOCATED):
        raise _refuse("Pixel Data missing (Rows, Columns, BitsAllocated present)")


def _check_native_pixels(walker: _Walker) -> None:
    rows, columns = walker.unsigned(_ROWS), walker.unsigned(_COLUMNS)
    bits = walker.unsigned(_BITS_ALLOCATED)
    if walker.pixel_data is None:
        return
    _, found = walker.pixel_data
    if found == UNDEFINED_LENGTH:
        raise _refuse("Pixel Data is encapsulated but the transfer syntax is native")
    if rows is None or columns is None or bits is None:
        raise _refuse("Pixel Data without Rows, Columns or BitsAllocated")
    samples = walker.unsigned(_SAMPLES_PER_PIXEL) or 1
    photometric = walker.image_values.get(_PHOTOMETRIC_INTERPRETATION, b"").strip(b" \x00")
    expected = expected_pixel_bytes(rows, columns, samples, bits, walker.frames(),
                                    subsampled_422=photometric == b"YBR_FULL_422")
    # Longer is readable (trailing padding, which pydicom and DCMTK ignore); shorter is not.
    if found < expected:
        raise _refuse(f"Pixel Data is {found} bytes, its attributes imply {expected}")


def check_structure(data: bytes | memoryview, transfer_syntax: UID,
                    sop_class_uid: str | None = None) -> None:
    """Check that ``data`` is exactly one complete data set encoded in ``transfer_syntax``.

    Walks the top-level elements to the end of the buffer (and the items of undefined-length
    sequences, to find where they end): every header valid for the syntax, every length
    within the buffer, tags in ascending order, native Pixel Data as long as Rows x Columns x
    SamplesPerPixel x BitsAllocated x NumberOfFrames implies, encapsulated Pixel Data as an
    offset table, fragments and a delimiter (PS3.5 7.1, 7.5, A.4). Pixels are not decoded.
    Deflated data sets (PS3.5 A.5) are inflated first.

    Parameters
    ----------
    data
        The encoded data set as received (no preamble or file meta information).
    transfer_syntax
        The presentation context's transfer syntax.
    sop_class_uid
        The SOP Class of the instance, if known: an image storage class requires pixel data.

    Raises
    ------
    RejectedInstance
        ``CANNOT_UNDERSTAND`` with what is wrong and where.
    """
    if transfer_syntax.is_deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflater.decompress(data)
        except zlib.error as exc:
            raise _refuse(f"deflated data set cannot be inflated ({str(exc)[:24]})") from exc
        if not inflater.eof:  # bytes after the end of the stream are not part of the data set
            raise _refuse("deflated data set is truncated")
    if not data:
        raise _refuse("the data set is empty")
    walker = _Walker(data, implicit=transfer_syntax.is_implicit_VR,
                     little_endian=transfer_syntax.is_little_endian)
    walker.walk_data_set(0, len(data), depth=0, until_delimiter=False)
    _check_pixels_present(walker, sop_class_uid)
    if transfer_syntax.is_encapsulated:
        if walker.pixel_data is not None and walker.pixel_data[1] != UNDEFINED_LENGTH:
            raise _refuse("Pixel Data is native but the transfer syntax is encapsulated")
        return
    _check_native_pixels(walker)


def data_set_offset(part10: bytes | memoryview) -> int:
    """Return where the data set of a Part 10 file starts: after the preamble, "DICM" and the
    file meta information group (0002), which is always explicit VR little endian (PS3.10 7.1).
    """
    pos = 132 if bytes(part10[128:132]) == b"DICM" else 0
    while len(part10) - pos >= 8 and struct.unpack_from("<H", part10, pos)[0] == 0x0002:
        vr = bytes(part10[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            if len(part10) - pos < 12:
                break
            pos += 12 + struct.unpack_from("<I", part10, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", part10, pos + 6)[0]
    return pos
