"""The node end to end with real peers: Orthanc routes a study in, results come back; crashes lose nothing."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import (
    OrthancProcess,
    StoreScpProcess,
    free_port,
    run_storescu,
    wait_until,
)
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY1 = HIPPO_DICOM / "Study1"
CROP_SERIES = STUDY1 / "13_HCropVolume"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"



def study_results(orthanc: OrthancProcess, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Return Orthanc's series of the study, grouped as SEG, SR, SC and images."""
    grouped: dict[str, list[dict[str, Any]]] = {"SEG": [], "SR": [], "SC": [], "images": []}
    for match in orthanc.lookup(study_uid):
        if match.get("Type") != "Study":
            continue
        for series in orthanc.series(match["ID"]):
            modality = series["MainDicomTags"].get("Modality", "")
            first = series["Instances"][0]
            sop_class = orthanc.metadata("instances", first).get("SopClassUid")
            key = modality if modality in ("SEG", "SR") else "SC" if sop_class == SC_CLASS else "images"
            grouped[key].append(series)
    return grouped


def test_orthanc_routes_study1_and_results_are_filed_in_the_same_study(
    make_orthanc: Callable[..., OrthancProcess], make_node: Callable[..., NodeProcess]
) -> None:
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = make_node(port=node_port, destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
                     config={"node": {"allowed_calling_ae_titles": [orthanc.aet]}})
    node.start()
    run_storescu([STUDY1], orthanc.dicom_port, called_aet=orthanc.aet)
    study_uid = str(pydicom.dcmread(next(CROP_SERIES.glob("*.dcm"))).StudyInstanceUID)
    results = wait_until(
        lambda: (r := study_results(orthanc, study_uid)) and all(r[k] for k in ("SEG", "SR", "SC")) and r,
        deadline_s=120, what="SEG, SR and SC in Orthanc", poll_s=0.5,
    )
    assert len(results["images"]) == 5  # the source series, untouched
    assert all(len(results[k]) == 1 for k in ("SEG", "SR", "SC"))
    # the node analysed only the crop series; the four 512x512 series were passed over
    jobs = node.ledger().job_rows()
    assert [j.state for j in jobs] == ["done"]
    crop_uid = str(pydicom.dcmread(next(CROP_SERIES.glob("*.dcm"))).SeriesInstanceUID)
    assert jobs[0].series_uid == crop_uid
    assert node.ledger().counts().instances == 32 + 4 * 22
    # the SEG as filed in Orthanc references the crop series, frame by frame
    seg_instance = results["SEG"][0]["Instances"][0]
    raw = orthanc.request("GET", f"/instances/{seg_instance}/file")
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(raw)))
    crop_sops = {str(pydicom.dcmread(p).SOPInstanceUID) for p in CROP_SERIES.glob("*.dcm")}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == crop_uid
    referenced = {
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced and referenced <= crop_sops
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Hippocampus anterior", "Hippocampus posterior"]
    assert seg.StudyDescription == pydicom.dcmread(next(CROP_SERIES.glob("*.dcm"))).StudyDescription
    # the routing flag keeps our results from being routed back to the node
    time.sleep(3)
    assert node.ledger().counts().instances == 32 + 4 * 22


def deliveries_of(node: NodeProcess) -> Counter[str]:
    return Counter(d.state for j in node.ledger().job_rows() for d in j.deliveries)


def received_sops(scp: StoreScpProcess) -> Counter[str]:
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in scp.received())


def test_kill_during_receive_then_restart_delivers_once(
    storescp: StoreScpProcess, make_node: Callable[..., NodeProcess]
) -> None:
    node = make_node(destinations={"pacs": (storescp.aet, storescp.host, storescp.port)},
                     config={"node": {"ae_title": "AINODE"}, "grouping": {"quiet_period_s": 3.0}})
    node.start()
    files = sorted(CROP_SERIES.glob("*.dcm"))
    run_storescu(files[:16], node.port, called_aet="AINODE")
    node.kill()
    acknowledged = node.ledger().counts().instances
    assert acknowledged == 16
    node.start()
    run_storescu(files, node.port, called_aet="AINODE")  # the sender retries the whole series
    wait_until(lambda: deliveries_of(node)["sent"] == 1, deadline_s=120, what="results sent")
    sops = received_sops(storescp)
    assert len(sops) == 3 and set(sops.values()) == {1}
    assert node.ledger().counts().instances == 32


def test_kill_while_job_runs_then_restart_delivers_once(
    storescp: StoreScpProcess, make_node: Callable[..., NodeProcess]
) -> None:
    config = {"analyses": {"hippocampus": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                                           "options": {"delay_s": 6.0}}}}
    node = make_node(destinations={"pacs": (storescp.aet, storescp.host, storescp.port)}, config=config)
    node.start()
    run_storescu([CROP_SERIES], node.port, called_aet="DICOMNODE")
    wait_until(lambda: any(j.state == "running" for j in node.ledger().job_rows()),
               deadline_s=30, what="job running")
    node.kill()
    node.start()
    wait_until(lambda: deliveries_of(node)["sent"] == 1, deadline_s=120, what="results sent")
    (job,) = node.ledger().job_rows()
    assert job.state == "done" and job.attempts == 2
    time.sleep(1.0)
    sops = received_sops(storescp)
    assert len(sops) == 3 and set(sops.values()) == {1}


def test_destination_down_results_delivered_when_back(
    tmp_path: Path, make_node: Callable[..., NodeProcess]
) -> None:
    scp = StoreScpProcess(tmp_path / "late-pacs", aet="PACS")
    node = make_node(destinations={"pacs": ("PACS", "127.0.0.1", scp.port)})
    node.start()
    run_storescu([CROP_SERIES], node.port, called_aet="DICOMNODE")
    wait_until(lambda: any(d.attempts >= 2 for j in node.ledger().job_rows()
                           for d in j.deliveries), deadline_s=60, what="two failed attempts")
    (job,) = node.ledger().job_rows()
    assert "cannot connect to PACS@127.0.0.1" in job.deliveries[0].last_error
    scp.start()
    try:
        wait_until(lambda: deliveries_of(node)["sent"] == 1, deadline_s=60, what="delivery")
        assert len(received_sops(scp)) == 3
    finally:
        scp.stop()


def test_late_instance_supersedes_results_under_the_same_uids(
    storescp: StoreScpProcess, make_node: Callable[..., NodeProcess]
) -> None:
    node = make_node(destinations={"pacs": (storescp.aet, storescp.host, storescp.port)})
    node.start()
    files = sorted(CROP_SERIES.glob("*.dcm"), key=lambda p: int(p.stem))
    run_storescu(files[:-1], node.port, called_aet="DICOMNODE")
    wait_until(lambda: deliveries_of(node)["sent"] == 1, deadline_s=60, what="first results")
    first = node.ledger().job_rows()[0].summary
    run_storescu(files[-1:], node.port, called_aet="DICOMNODE")  # a late instance
    wait_until(lambda: deliveries_of(node)["sent"] == 2, deadline_s=60, what="second results")
    jobs = node.ledger().job_rows()
    assert [j.generation for j in jobs] == [2, 1]
    second = jobs[0].summary
    assert second["result_uids"] == first["result_uids"]  # replaces, never adds
    sops = received_sops(storescp)
    assert len(sops) == 3 and set(sops.values()) == {2}
    study = node.ledger().study(jobs[0].study_uid)
    assert study is not None and study.generation == 2
