"""The node under load at its front door: a burst of senders, and silent peers holding connections."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import DCMTK_ENV, StoreScpProcess, free_port, wait_until
from tests.conftest import HIPPO_DICOM
from tests.integration.raw_association import EXPLICIT_LITTLE, RawAssociation, associate_rq

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]

SERIES = HIPPO_DICOM / "Study2" / "14_HCropVolume"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


#: Seconds a silent connection may stay open in the lock-out test (default 5: this leaves time
#: to measure the CPU while all of them are open).
REQUEST_TIMEOUT_S = 8.0


@pytest.fixture
def node(tmp_path: Path, storescp: StoreScpProcess, request: pytest.FixtureRequest) -> Iterator[NodeProcess]:
    # the node's connection limits keep their defaults
    config = getattr(request, "param", None)
    process = NodeProcess(tmp_path / "node", port=free_port(),
                          destinations={"pacs": (storescp.aet, storescp.host, storescp.port)},
                          config=config)
    process.start()
    yield process
    process.stop()
    print(process.log_text()[-6000:])


def copy_study(folder: Path) -> str:
    """Copy the real crop series under new study, series and instance UIDs; return the study UID."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for source in sorted(SERIES.glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")
    return study


def storescu(folder: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "+sd", "127.0.0.1", str(port),
         str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **DCMTK_ENV},
    )


def results_by_study(storescp: StoreScpProcess) -> dict[str, Counter[str]]:
    """{study UID: {SOP Instance UID: times received}} of what reached the destination."""
    found: dict[str, Counter[str]] = {}
    for path in storescp.received():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.setdefault(str(ds.StudyInstanceUID), Counter())[str(ds.SOPInstanceUID)] += 1
    return found


def wait_for_results(node: NodeProcess, studies: list[str], deadline_s: float) -> None:
    def done() -> bool:
        jobs = [j for j in node.ledger().job_rows(limit=1000) if j.analysis == "hippocampus"]
        return len(jobs) == len(studies) and all(
            j.state == "done" and [d.state for d in j.deliveries] == ["sent"] for j in jobs)

    wait_until(done, deadline_s=deadline_s, what="every study analysed and its results sent",
               poll_s=1.0)


def assert_each_result_once(node: NodeProcess, storescp: StoreScpProcess, studies: list[str]) -> None:
    jobs = [j for j in node.ledger().job_rows(limit=1000) if j.analysis == "hippocampus"]
    assert sorted(j.study_uid for j in jobs) == sorted(studies)  # one job per study
    results = results_by_study(storescp)
    assert sorted(results) == sorted(studies)
    counts = {len(instances) for instances in results.values()}
    assert len(counts) == 1  # every study got the same set of result objects
    assert all(n == 1 for instances in results.values() for n in instances.values())


#: The default quiet period: 20 senders sharing two cores leave gaps of over a second between
#: the instances of one study (the test harness's 1 s would cut studies short).
DEFAULT_GROUPING = {"grouping": {"quiet_period_s": 10.0, "max_wait_s": 600.0}}


@pytest.mark.parametrize("node", [DEFAULT_GROUPING], indirect=True)
def test_twenty_senders_at_once_are_all_analysed_once(
    tmp_path: Path, node: NodeProcess, storescp: StoreScpProcess
) -> None:
    """A PACS flushing its queue after an outage: 20 storescu processes start together."""
    studies = [copy_study(tmp_path / f"study{i:02d}") for i in range(20)]
    senders = [storescu(tmp_path / f"study{i:02d}", node.port) for i in range(20)]
    for sender in senders:
        output, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, output
    ledger = node.ledger()
    for study in studies:
        (series,) = ledger.series_of_study(study)
        assert series.instance_count == len(list(SERIES.glob("*.dcm")))
    wait_for_results(node, studies, deadline_s=600)
    assert_each_result_once(node, storescp, studies)
    log = node.log_text()
    assert "rejected association" not in log and "Traceback" not in log


def node_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process so far (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("node", [{"node": {"association_request_timeout_s": REQUEST_TIMEOUT_S}}],
                         indirect=True)
def test_silent_peers_do_not_keep_a_study_out(
    tmp_path: Path, node: NodeProcess, storescp: StoreScpProcess
) -> None:
    """16 connections that send 6 bytes of an A-ASSOCIATE-RQ and stop, and 50 idle sockets:
    a real study is accepted at once and analysed, the node's CPU stays low while they hang,
    and each of them is closed within ``node.association_request_timeout_s``.

    They come from the sender's own address, past ``node.max_connections_per_address`` (48):
    a connection from there that is still sending its request is not dropped for them. 20
    idle sockets from another address, opened first, are not displaced by the flood either
    (``node.max_pending_connections``, 64): they stay until their own timeout."""
    assert node.process is not None
    study = copy_study(tmp_path / "study")
    opened = time.monotonic()
    elsewhere = []
    for _ in range(20):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))  # Linux routes all of 127/8 to the loopback interface
        sock.connect(("127.0.0.1", node.port))
        elsewhere.append(sock)
    request = associate_rq("DICOMNODE", "SLOWSENDER", MR_IMAGE_STORAGE, EXPLICIT_LITTLE)
    slow = RawAssociation("127.0.0.1", node.port, timeout_s=30)
    slow.sock.sendall(request[:10])
    answers: list[int | None] = []

    def send_slowly(sent: int) -> None:
        """Go on sending the request a byte every 0.2 s while the node takes in the flood."""
        try:
            for _ in range(7):
                time.sleep(0.2)
                slow.sock.sendall(request[sent:sent + 1])
                sent += 1
            slow.sock.sendall(request[sent:])
            answer = slow.read_pdu()
            answers.append(answer[0] if answer is not None else None)
            if answer is not None:
                slow.release()
        except OSError:  # dropped by the node
            answers.append(None)
        finally:
            slow.close()

    sent = 10
    socks = []
    for index in range(66):
        sock = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        if index < 16:
            sock.sendall(b"\x01\x00\xff\xff\xff\xff")
        socks.append(sock)
        if index % 8 == 0:
            slow.sock.sendall(request[sent:sent + 1])
            sent += 1
    slow_sender = threading.Thread(target=send_slowly, args=(sent,))
    slow_sender.start()
    closed_after: dict[socket.socket, float] = {}

    def wait_closed(sock: socket.socket) -> None:
        try:
            if sock.recv(1) == b"":
                closed_after[sock] = time.monotonic() - opened
        except OSError:  # closed here, after a failure
            pass

    waiters = [threading.Thread(target=wait_closed, args=(s,)) for s in socks + elsewhere]
    try:
        for waiter in waiters:
            waiter.start()
        time.sleep(1.5)  # every connection accepted and its threads started
        slow_sender.join(timeout=10)
        assert answers == [0x02]  # A-ASSOCIATE-AC: not dropped for the flood
        cpu_started, wall_started = node_cpu_s(node.process.pid), time.monotonic()
        time.sleep(2.0)
        cpu_share = (node_cpu_s(node.process.pid) - cpu_started) / (time.monotonic() - wall_started)
        print(f"node CPU while 86 connections hang: {cpu_share:.1%} of a core")
        assert cpu_share < 0.10
        started = time.monotonic()
        sender = storescu(tmp_path / "study", node.port)
        output, _ = sender.communicate(timeout=60)
        sent_s = time.monotonic() - started
        assert sender.returncode == 0, output
        print(f"study accepted in {sent_s:.2f} s while they hang")
        assert sent_s < 2.0 and time.monotonic() - opened < REQUEST_TIMEOUT_S  # all still open
        for waiter in waiters:
            waiter.join(timeout=REQUEST_TIMEOUT_S + 5)
        times = list(closed_after.values())
        print(f"silent connections closed after {min(times):.1f}-{max(times):.1f} s")
        assert len(times) == 86 and max(times) < REQUEST_TIMEOUT_S + 2.0
        # the other address's connections ran to their timeout: the flood displaced its own
        assert min(closed_after[sock] for sock in elsewhere) > REQUEST_TIMEOUT_S - 1.0
    finally:
        for sock in socks + elsewhere:
            sock.close()
    wait_for_results(node, [study], deadline_s=180)
    assert_each_result_once(node, storescp, [study])
    assert "Traceback" not in node.log_text()
