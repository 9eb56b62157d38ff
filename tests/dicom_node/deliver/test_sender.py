"""The sender against real pynetdicom peers on 127.0.0.1: association rejections a PACS answers, and the transfer syntax each file goes in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import Destination
from dicom_node.deliver.sender import send_files
from dicom_node.errors import DeliveryFailed
from tests.conftest import HIPPO_CROP_STUDY1


@contextmanager
def _storage_peer(*transfer_syntaxes: str) -> Iterator[tuple[list[Dataset], int]]:
    """A pynetdicom Storage SCP, AE title PACS, one association at a time, taking MR images in
    ``transfer_syntaxes`` (pynetdicom's default uncompressed ones without): (the data sets it
    stored, each with the transfer syntax it came in as ``file_meta``, port)."""
    stored: list[Dataset] = []

    def handle_store(event: Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        stored.append(dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.maximum_associations = 1
    ae.add_supported_context(MRImageStorage, list(transfer_syntaxes) or None)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    try:
        yield stored, int(server.server_address[1])
    finally:
        server.shutdown()


@pytest.fixture
def peer() -> Iterator[tuple[list[Dataset], int]]:
    """A pynetdicom Storage SCP taking MR images in pynetdicom's default transfer syntaxes."""
    with _storage_peer() as running:
        yield running


def _one_file() -> list[Path]:
    return sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:1]


def test_permanent_rejection_is_not_retryable(peer: tuple[list[Dataset], int]) -> None:
    _, port = peer
    wrong_called = Destination(ae_title="NOTPACS", host="127.0.0.1", port=port)
    with pytest.raises(DeliveryFailed, match=r"rejected the association \(Rejected Permanent") as info:
        send_files(_one_file(), wrong_called, calling_ae_title="DICOMNODE", timeout_s=10)
    assert "Called AE title not recognised" in str(info.value)
    assert not info.value.retryable


def test_transient_rejection_is_retryable(peer: tuple[list[Dataset], int]) -> None:
    _, port = peer
    busy = AE(ae_title="OTHER")
    busy.add_requested_context(Verification)
    held = busy.associate("127.0.0.1", port, ae_title="PACS")
    assert held.is_established
    try:
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
        with pytest.raises(DeliveryFailed, match=r"rejected the association \(Rejected Transient") as info:
            send_files(_one_file(), destination, calling_ae_title="DICOMNODE", timeout_s=10)
        assert info.value.retryable
    finally:
        held.release()


def test_the_same_peer_accepts_its_own_ae_title(peer: tuple[list[Dataset], int]) -> None:
    stored, port = peer
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    sent = send_files(_one_file(), destination, calling_ae_title="DICOMNODE", timeout_s=10)
    assert sent == [str(ds.SOPInstanceUID) for ds in stored] and len(sent) == 1


@pytest.mark.parametrize("peer_takes", [(), (ImplicitVRLittleEndian,)], ids=["as-stored", "converted"])
def test_a_file_goes_as_stored_when_the_peer_takes_its_syntax_and_converted_otherwise(
    peer_takes: tuple[str, ...],
) -> None:
    (path,) = _one_file()
    source = pydicom.dcmread(path)
    assert source.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with _storage_peer(*peer_takes) as (stored, port):
        destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
        assert send_files([path], destination, calling_ae_title="DICOMNODE", timeout_s=10) == [
            str(source.SOPInstanceUID)]
    (received,) = stored
    expected = ImplicitVRLittleEndian if peer_takes else ExplicitVRLittleEndian
    assert received.file_meta.TransferSyntaxUID == expected
    assert received.PixelData == source.PixelData
    assert {e.tag for e in received} == {e.tag for e in source}
