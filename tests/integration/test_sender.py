"""Sending results: C-STORE to a real DCMTK storescp, and failures a hospital network produces."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.cli.main import main
from dicom_node.config import Destination
from dicom_node.deliver import sender
from dicom_node.errors import DeliveryFailed
from dicom_node.deliver.delivery import backoff_s
from dicom_node.deliver.sender import echo, send_files
from tests.conftest import HIPPO_CROP_STUDY1
from deploy.local.orthanc_process import StoreScpProcess, free_port

pytestmark = pytest.mark.integration


def test_send_files_one_association(storescp: StoreScpProcess) -> None:
    files = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:5]
    destination = Destination(ae_title=storescp.aet, host=storescp.host, port=storescp.port)
    stored = send_files(files, destination, calling_ae_title="DICOMNODE")
    assert stored == [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    received = storescp.wait_for_count(5, deadline_s=10)
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in received} == set(stored)
    assert storescp.log_text().count("Association Acknowledged") == 1


# pynetdicom 3.0 leaves the socket of a refused connection for the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_destination_down_is_retryable(tmp_path: Path) -> None:
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
    with pytest.raises(DeliveryFailed, match="cannot connect") as info:
        send_files([next(HIPPO_CROP_STUDY1.glob("*.dcm"))], destination, calling_ae_title="DICOMNODE",
                   timeout_s=5)
    assert info.value.retryable


def test_unreadable_result_is_not_retryable(tmp_path: Path, storescp: StoreScpProcess) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    destination = Destination(ae_title=storescp.aet, host=storescp.host, port=storescp.port)
    with pytest.raises(DeliveryFailed, match="unreadable") as info:
        send_files([broken], destination, calling_ae_title="DICOMNODE")
    assert not info.value.retryable


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_s(n, 60, 600) for n in range(1, 7)] == [60, 120, 240, 480, 600, 600]


def test_cli_echo_and_send(storescp: StoreScpProcess, capsys: pytest.CaptureFixture[str]) -> None:
    peer = f"{storescp.aet}@{storescp.host}:{storescp.port}"
    assert main(["echo", peer]) == 0
    assert "0x0000 Success" in capsys.readouterr().out
    assert main(["send", peer, str(HIPPO_CROP_STUDY1)]) == 0
    assert "sent 32 instance(s)" in capsys.readouterr().out
    assert len(storescp.wait_for_count(32, deadline_s=20)) == 32
    destination = Destination(ae_title=storescp.aet, host=storescp.host, port=storescp.port)
    assert echo(destination, calling_ae_title="DICOMNODE") == 0


def test_cli_send_to_nobody_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    result = subprocess.run(
        [".venv/bin/dicom-node", "send", f"PACS@127.0.0.1:{free_port()}", str(HIPPO_CROP_STUDY1)],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 1
    assert "failed: cannot connect to PACS@127.0.0.1" in result.stderr


class _LateReactor(threading.Event):
    """pynetdicom's reactor checkpoint, with the reactor held up right after it passes it.

    pynetdicom pauses its association reactor before a C-STORE by clearing the checkpoint and
    waiting for the reactor's ``_is_paused`` flag, which the reactor sets before it waits and
    clears after. A reactor that has just passed the checkpoint still shows the flag, so the
    C-STORE goes out while the reactor goes on to look for a message, and it can take the
    peer's response (pynetdicom logs "Received unexpected C-STORE service message"). Here the
    reactor lingers 50 ms past the checkpoint and the sender takes 100 ms to look for the
    response, as a busy machine can schedule them, so nearly every C-STORE meets that race.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set()

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)  # only the reactor waits on it
        time.sleep(0.05)
        return passed


def test_a_response_taken_by_pynetdicom_s_reactor_still_reaches_the_sender(
    storescp: StoreScpProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every C-STORE gets its response even when the association's reactor takes it first."""
    def late_reactor(ae: AE, destination: Destination) -> Association:
        assoc = real_associate(ae, destination)
        assoc._reactor_checkpoint = _LateReactor()
        get_msg = assoc.dimse.get_msg

        def late_sender(block: bool = False) -> Any:
            if block:  # the sender waiting for its response; the reactor never blocks
                time.sleep(0.1)
            return get_msg(block)

        assoc.dimse.get_msg = late_sender  # type: ignore[method-assign]
        return assoc

    real_associate = sender.associate
    monkeypatch.setattr(sender, "associate", late_reactor)
    files = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:5]
    destination = Destination(ae_title=storescp.aet, host=storescp.host, port=storescp.port)
    started = time.monotonic()
    stored = send_files(files, destination, calling_ae_title="DICOMNODE", timeout_s=5)
    assert stored == [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    assert time.monotonic() - started < 4.0  # no response waited out its DIMSE timeout
