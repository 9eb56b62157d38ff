"""A DICOM requestor written on raw sockets, so tests can send what no toolkit would (PS3.8 9.3)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import read_dataset

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"


def _uid(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return raw + b"\x00" * (len(raw) % 2)


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(called: str, calling: str, abstract_syntax: str, transfer_syntax: str,
                 *, max_pdu_bytes: int = 65536) -> bytes:
    """Return an A-ASSOCIATE-RQ PDU proposing one presentation context (ID 1)."""
    context = bytes([1, 0, 0, 0]) + _item(0x30, abstract_syntax.encode()) + _item(
        0x40, transfer_syntax.encode())
    user = _item(0x51, struct.pack(">I", max_pdu_bytes))
    variable = _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context) + _item(0x50, user)
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
            + b"\x00" * 32 + variable)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def c_store_command(sop_class_uid: str | bytes, sop_instance_uid: str | bytes,
                    message_id: int = 1) -> bytes:
    """Return a C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1)."""
    body = b"".join((
        _element(0x0000, 0x0002, _uid(sop_class_uid)),
        _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
        _element(0x0000, 0x0110, struct.pack("<H", message_id)),
        _element(0x0000, 0x0700, struct.pack("<H", 0)),
        _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),
        _element(0x0000, 0x1000, _uid(sop_instance_uid)),
    ))
    return _element(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """Return one P-DATA-TF PDU carrying one PDV."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, header) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


RELEASE_RQ = struct.pack(">BBII", 0x05, 0, 4, 0)


@dataclass
class StoreResponse:
    """What came back for a C-STORE: a status (and comment), or how the association ended."""

    status: int | None
    error_comment: str
    ended_by: str  # "response", "abort", "closed" or "timeout"


class RawAssociation:
    """One TCP connection that speaks just enough of the Upper Layer protocol to send C-STOREs."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_exact(self, count: int) -> bytes | None:
        chunks = b""
        while len(chunks) < count:
            chunk = self.sock.recv(count - len(chunks))
            if not chunk:
                return None
            chunks += chunk
        return chunks

    def read_pdu(self) -> tuple[int, bytes] | None:
        """Return the next PDU's (type, body), or None when the peer closed the connection."""
        header = self._read_exact(6)
        if header is None:
            return None
        kind, _, length = struct.unpack(">BBI", header)
        body = self._read_exact(length)
        return None if body is None else (kind, body)

    def associate(self, abstract_syntax: str, transfer_syntax: str, *, called: str = "DICOMNODE",
                  calling: str = "FUZZER") -> int:
        """Send an A-ASSOCIATE-RQ; return the answer's PDU type (2: accepted, 3: rejected)."""
        self.sock.sendall(associate_rq(called, calling, abstract_syntax, transfer_syntax))
        pdu = self.read_pdu()
        if pdu is None:
            raise ConnectionError("the node closed the connection instead of answering")
        kind, body = pdu
        if kind == 0x02 and not self._context_accepted(body):
            raise ConnectionError("the node accepted the association but not its context")
        return kind

    @staticmethod
    def _context_accepted(body: bytes) -> bool:
        pos = 68
        while pos + 4 <= len(body):
            kind, _, length = struct.unpack_from(">BBH", body, pos)
            if kind == 0x21:
                return body[pos + 6] == 0  # result: acceptance
            pos += 4 + length
        return False

    def send_store(self, sop_class_uid: str | bytes, sop_instance_uid: str | bytes,
                   data_set: bytes, *, pdu_bytes: int = 16384) -> None:
        """Send a C-STORE-RQ: its command, then the data set in PDVs of ``pdu_bytes``."""
        self.sock.sendall(p_data(1, c_store_command(sop_class_uid, sop_instance_uid), command=True))
        chunks = [data_set[i:i + pdu_bytes] for i in range(0, len(data_set), pdu_bytes)] or [b""]
        for index, chunk in enumerate(chunks):
            self.sock.sendall(p_data(1, chunk, command=False, last=index == len(chunks) - 1))

    def read_store_response(self, timeout_s: float = 10.0) -> StoreResponse:
        """Wait for the C-STORE-RSP; say how the association ended if none came."""
        self.sock.settimeout(timeout_s)
        command = b""
        try:
            while True:
                pdu = self.read_pdu()
                if pdu is None:
                    return StoreResponse(None, "", "closed")
                kind, body = pdu
                if kind == 0x07:
                    return StoreResponse(None, "", "abort")
                if kind != 0x04:
                    continue
                pos = 0
                while pos < len(body):
                    length = struct.unpack_from(">I", body, pos)[0]
                    header = body[pos + 5]
                    command += body[pos + 6:pos + 4 + length]
                    pos += 4 + length
                    if header & 0x03 == 0x03:
                        rsp = read_dataset(BytesIO(command), True, True)
                        return StoreResponse(int(rsp.Status), str(rsp.get("ErrorComment", "")),
                                             "response")
        except (TimeoutError, socket.timeout):
            return StoreResponse(None, "", "timeout")
        except ConnectionResetError:
            return StoreResponse(None, "", "closed")

    def release(self) -> None:
        """Send A-RELEASE-RQ and wait (briefly) for the reply."""
        self.sock.sendall(RELEASE_RQ)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            pdu = self.read_pdu()
            if pdu is None or pdu[0] == 0x06:
                return


def store_raw(host: str, port: int, sop_class_uid: str | bytes, sop_instance_uid: str | bytes,
              data_set: bytes, transfer_syntax: str = EXPLICIT_LITTLE,
              *, abstract_syntax: str | None = None, timeout_s: float = 10.0) -> StoreResponse:
    """Associate, send one C-STORE with ``data_set`` as given, return the response and release.

    The presentation context proposes ``abstract_syntax`` (by default the SOP Class UID).
    """
    if abstract_syntax is None:
        abstract_syntax = sop_class_uid.decode() if isinstance(sop_class_uid, bytes) else sop_class_uid
    with RawAssociation(host, port, timeout_s=timeout_s) as assoc:
        if assoc.associate(abstract_syntax, transfer_syntax) != 0x02:
            raise ConnectionError("association rejected")
        assoc.send_store(sop_class_uid, sop_instance_uid, data_set)
        response = assoc.read_store_response(timeout_s)
        if response.ended_by == "response":
            assoc.release()
        return response
