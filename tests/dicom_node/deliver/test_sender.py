"""Association rejections a PACS answers, against real pynetdicom peers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import Destination
from dicom_node.deliver.sender import send_files
from dicom_node.errors import DeliveryFailed
from tests.conftest import HIPPO_CROP_STUDY1


@pytest.fixture
def peer() -> Iterator[tuple[list[str], int]]:
    """A pynetdicom Storage SCP, AE title PACS, one association at a time: (stored UIDs, port)."""
    stored: list[str] = []

    def handle_store(event: Event) -> int:
        stored.append(str(cast(C_STORE, event.request).AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.require_called_aet = True
    ae.maximum_associations = 1
    ae.add_supported_context(MRImageStorage)
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    assert server is not None
    yield stored, int(server.server_address[1])
    server.shutdown()


def _one_file() -> list[Path]:
    return sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:1]


def test_permanent_rejection_is_not_retryable(peer: tuple[list[str], int]) -> None:
    _, port = peer
    wrong_called = Destination(ae_title="NOTPACS", host="127.0.0.1", port=port)
    with pytest.raises(DeliveryFailed, match=r"rejected the association \(Rejected Permanent") as info:
        send_files(_one_file(), wrong_called, calling_ae_title="DICOMNODE", timeout_s=10)
    assert "Called AE title not recognised" in str(info.value)
    assert not info.value.retryable


def test_transient_rejection_is_retryable(peer: tuple[list[str], int]) -> None:
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


def test_the_same_peer_accepts_its_own_ae_title(peer: tuple[list[str], int]) -> None:
    stored, port = peer
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=port)
    sent = send_files(_one_file(), destination, calling_ae_title="DICOMNODE", timeout_s=10)
    assert sent == stored and len(sent) == 1
