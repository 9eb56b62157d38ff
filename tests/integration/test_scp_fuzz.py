"""Fuzzing the Storage SCP on raw sockets: nothing undecodable is acknowledged, every request is answered."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE

from dicom_node import status
from dicom_node.receive.scp import StorageSCP
from tests.conftest import HIPPO_CROP_STUDY1
from deploy.local.orthanc_process import wait_until
from tests.integration.raw_association import EXPLICIT_LITTLE, IMPLICIT_LITTLE, RawAssociation, store_raw
from tests.integration.test_receiver import make_scp, storescu

pytestmark = [pytest.mark.integration, pytest.mark.timing]

#: Wall-clock budget of the generated cases; the fixed cases always run.
GENERATED_BUDGET_S = 20.0


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    server = make_scp(tmp_path)
    server.start()
    yield server
    server.stop()


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def instance(index: int = 0) -> Dataset:
    return pydicom.dcmread(sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[index])


def spool_files(scp: StorageSCP) -> list[Path]:
    return [p for p in scp.spool.root.rglob("*") if p.is_file()]


def send(scp: StorageSCP, data: bytes, *, sop_class: str | bytes | None = None,
         sop_instance: str | bytes | None = None, syntax: str = EXPLICIT_LITTLE,
         ds: Dataset | None = None) -> tuple[int | None, str]:
    ds = ds if ds is not None else instance()
    started = time.monotonic()
    rsp = store_raw("127.0.0.1", scp.settings.port,
                    ds.SOPClassUID if sop_class is None else sop_class,
                    ds.SOPInstanceUID if sop_instance is None else sop_instance,
                    data, syntax, abstract_syntax=str(ds.SOPClassUID), timeout_s=10)
    assert rsp.ended_by == "response", f"no response: the association ended by {rsp.ended_by}"
    assert time.monotonic() - started < 5, "the response took too long"
    return rsp.status, rsp.error_comment


def test_malformed_cases_are_refused_with_a_reason(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    good = encode(instance())
    pixel = good.index(b"\xe0\x7f\x10\x00")
    cases = {
        "implicit VR body on an explicit VR context": (
            {"data": encode(instance(), implicit=True)}, status.CANNOT_UNDERSTAND, "(0008,0008) at offset 0: no valid VR (18 00)"),
        "Pixel Data declaring 200 MB with 1 KB sent": (
            {"data": good[:pixel] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 200_000_000)
             + bytes(1024)},
            status.CANNOT_UNDERSTAND, "truncated: (7FE0,0010) length 200000000, 1024 bytes left"),
        "random bytes after a tag past group 0x7FE0": (
            {"data": good + b"\xe0\x7f\x11\x00" + random.Random(1).randbytes(3000)},
            status.CANNOT_UNDERSTAND, "(7FE0,0011) at offset"),
        "empty SOP Instance UID": (
            {"data": good, "sop_instance": b""}, status.INVALID_IDENTIFIERS,
            "C-STORE request: AffectedSOPInstanceUID is empty"),
        "82-character SOP Instance UID": (
            {"data": good, "sop_instance": "1." + "2" * 80}, status.INVALID_IDENTIFIERS,
            "C-STORE request: AffectedSOPInstanceUID is 82 characters long"),
        "malformed SOP Instance UID": (
            {"data": good, "sop_instance": "1.2.abc"}, status.INVALID_IDENTIFIERS,
            "C-STORE request: AffectedSOPInstanceUID is invalid ('1.2.abc')"),
        "empty SOP Class UID": (
            {"data": good, "sop_class": b""}, status.INVALID_IDENTIFIERS,
            "C-STORE request: AffectedSOPClassUID is empty"),
        "empty data set": ({"data": b""}, status.CANNOT_UNDERSTAND, "the data set is empty"),
    }
    for name, (kwargs, expected_status, reason) in cases.items():
        got_status, comment = send(scp, **kwargs)  # type: ignore[arg-type]
        assert got_status == expected_status, name
        assert comment.startswith(reason), (name, comment)
        assert not spool_files(scp), name
    # one WARNING line per refusal, naming the reason; no traceback, no ERROR
    refusals = [r for r in caplog.records if r.getMessage().startswith("refused instance")]
    assert len(refusals) == len(cases)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # the next sender is served as before
    result = storescu(scp, *sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:3])
    assert result.returncode == 0, result.stderr
    assert scp.counters.stored == 3 and len(spool_files(scp)) == 3


def test_generated_malformed_data_sets_are_refused(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture
) -> None:
    """Seeded: truncations, re-encodings in the wrong syntax and noise tails, within a time budget."""
    caplog.set_level(logging.WARNING)
    rng = random.Random(13)
    sources = [instance(i) for i in range(3)]
    deadline = time.monotonic() + GENERATED_BUDGET_S
    sent = 0
    while time.monotonic() < deadline and sent < 60:
        ds = rng.choice(sources)
        data = encode(ds)
        kind = sent % 4
        syntax = EXPLICIT_LITTLE
        if kind == 0:  # cut anywhere
            data = data[:rng.randrange(1, len(data))]
        elif kind == 1:  # the other VR encoding than the context says
            data = encode(ds, implicit=True)
        elif kind == 2:
            syntax = IMPLICIT_LITTLE  # explicit bytes on an implicit context
        else:  # noise after the pixel data
            data += b"\xf0\x7f\x10\x00" + rng.randbytes(rng.randrange(1, 5000))
        got_status, comment = send(scp, data, syntax=syntax, ds=ds)
        assert got_status in (status.CANNOT_UNDERSTAND, status.INVALID_IDENTIFIERS,
                              status.DATASET_DOES_NOT_MATCH_SOP_CLASS), (kind, comment)
        assert comment, kind
        sent += 1
    assert sent >= 8
    assert not spool_files(scp)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert send(scp, encode(sources[0]), ds=sources[0]) == (status.SUCCESS, "")


def hang(port: int, *, six_bytes: int, idle: int) -> tuple[list[socket.socket], float]:
    """Open ``six_bytes`` connections that send the start of an A-ASSOCIATE-RQ (length
    0xFFFFFFFF) and stop, and ``idle`` connections that send nothing; return them and the
    longest any one took to connect."""
    socks = []
    slowest_s = 0.0
    for index in range(six_bytes + idle):
        started = time.monotonic()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        slowest_s = max(slowest_s, time.monotonic() - started)
        if index < six_bytes:
            sock.sendall(b"\x01\x00\xff\xff\xff\xff")
        socks.append(sock)
    return socks, slowest_s


def test_stalled_and_idle_connections_never_keep_a_sender_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """16 six-byte connections and 50 idle sockets: a real sender is served at once, the node
    spends little CPU while they hang, and each is closed within the request timeout."""
    caplog.set_level(logging.WARNING)
    timeout_s = 5.0
    server = make_scp(tmp_path, association_request_timeout_s=timeout_s)  # default limits
    server.start()
    opening = time.monotonic()
    socks, slowest_s = hang(server.settings.port, six_bytes=16, idle=50)
    try:
        # A connection beyond a full listen backlog waits out a SYN retransmission (1 s).
        assert slowest_s < 0.9, f"a connection took {slowest_s:.2f} s: the listen backlog was full"
        time.sleep(1.5)  # all accepted and their threads started
        cpu_started, wall_started = time.process_time(), time.monotonic()
        time.sleep(1.5)
        cpu_share = (time.process_time() - cpu_started) / (time.monotonic() - wall_started)
        print(f"CPU while 66 connections hang: {cpu_share:.1%} of a core")
        assert cpu_share < 0.10
        started = time.monotonic()
        result = storescu(server, *sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:5])
        served_s = time.monotonic() - started
        print(f"5 instances stored in {served_s:.2f} s while they hang")
        assert result.returncode == 0, result.stderr
        assert served_s < 2.0 and server.counters.stored == 5
        assert time.monotonic() - opening < timeout_s  # served while every one of them was open
        for sock in socks:  # every one closed by the node, none later than the timeout allows
            assert sock.recv(1) == b""
        assert time.monotonic() - started < timeout_s + 2.0
    finally:
        for sock in socks:
            sock.close()
        server.stop()
    refused = server.counters.refused_connections
    assert refused["request_timeout"] + refused["pending_limit"] + refused["address_limit"] == 66
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    # one line per kind of closure and peer address within 10 s, not one per connection
    closures = [r for r in caplog.records if "A-ASSOCIATE-RQ" in r.getMessage()]
    assert 1 <= len(closures) <= 3, [r.getMessage() for r in closures]


def test_at_the_association_limit_a_sender_waits_then_is_refused_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = make_scp(tmp_path, max_associations=1, association_wait_s=1.0)
    server.start()
    ds = instance()
    try:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(ds.SOPClassUID, EXPLICIT_LITTLE)
        assoc = holder.associate("127.0.0.1", server.settings.port, ae_title="DICOMNODE")
        assert assoc.is_established
        started = time.monotonic()
        refused = storescu(server, sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[0])
        waited_s = time.monotonic() - started
        assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stderr, refused.stderr
        assert 1.0 <= waited_s < 3.0
        # a slot freed while a sender waits is taken at once
        threading.Timer(0.3, assoc.release).start()
        result = storescu(server, sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[0])
        assert result.returncode == 0, result.stderr
        assert server.counters.stored == 1
    finally:
        server.stop()
    assert server.counters.refused_connections == {"association_limit": 1}
    (line,) = [r.getMessage() for r in caplog.records if "slots busy" in r.getMessage()]
    assert line.startswith("rejected association from 127.0.0.1 (AE STORESCU): all 1 association")


def test_noise_on_a_connection_is_one_warning_naming_the_peer(
    scp: StorageSCP, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """64 KB of random bytes: one WARNING for the association, no traceback, nothing on stderr."""
    caplog.set_level(logging.DEBUG)
    noise = random.Random(64).randbytes(65536)
    with socket.create_connection(("127.0.0.1", scp.settings.port), timeout=10) as sock:
        try:
            sock.sendall(noise)
            answer = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # closed by the node
        assert answer[:1] in (b"\x07", b"")  # A-ABORT (PS3.8 9.3.8), then we hang up
    deadline = time.monotonic() + 5
    while scp.gate.counts() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert loud[0].getMessage().startswith("association with 127.0.0.1: ")
    assert not [r for r in caplog.records if r.exc_info]
    assert "Traceback" not in capfd.readouterr().err
    assert send(scp, encode(instance())) == (status.SUCCESS, "")


def test_a_peer_that_stops_inside_a_pdu_is_dropped_after_the_network_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Associated, then a P-DATA-TF header announcing 1 MB and 10 bytes of it: the socket's read
    timeout (``node.network_timeout_s``) ends the association, and its slot comes free."""
    caplog.set_level(logging.WARNING)
    server = make_scp(tmp_path, network_timeout_s=2.0, max_associations=1, association_wait_s=0)
    server.start()
    ds = instance()
    try:
        with RawAssociation("127.0.0.1", server.settings.port, timeout_s=10) as raw:
            assert raw.associate(str(ds.SOPClassUID), EXPLICIT_LITTLE) == 0x02
            raw.sock.sendall(struct.pack(">BBI", 0x04, 0, 1_000_000) + bytes(10))
            started = time.monotonic()
            while (pdu := raw.read_pdu()) is not None and pdu[0] != 0x07:
                pass  # until the A-ABORT or the close
            dropped_s = time.monotonic() - started
        print(f"dropped {dropped_s:.1f} s after it stopped")
        assert 1.5 <= dropped_s < 5.0
        wait_until(lambda: server.gate.counts() == (0, 0) or None, deadline_s=5, what="slot freed")
        assert send(server, encode(ds), ds=ds) == (status.SUCCESS, "")
    finally:
        server.stop()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_connections_beyond_the_per_address_cap_are_refused_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    server = make_scp(tmp_path, max_connections_per_address=1)
    server.start()
    ds = instance()
    try:
        holder = AE(ae_title="HOLDER")
        holder.add_requested_context(ds.SOPClassUID, EXPLICIT_LITTLE)
        assoc = holder.associate("127.0.0.1", server.settings.port, ae_title="DICOMNODE")
        assert assoc.is_established
        with socket.create_connection(("127.0.0.1", server.settings.port), timeout=5) as extra:
            assert extra.recv(1) == b""  # closed at once: the address's one connection is in use
        assoc.release()
        assert send(server, encode(ds), ds=ds) == (status.SUCCESS, "")
    finally:
        server.stop()
    assert server.counters.refused_connections == {"address_limit": 1}
    (line,) = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert line == ("refused connection from 127.0.0.1: 1 connection(s) from that address, every one "
                    "associated or still sending its request (node.max_connections_per_address)")
