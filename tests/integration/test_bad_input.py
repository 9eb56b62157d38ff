"""Bad input is refused or failed with a specific reason while a good study sent at the same time completes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import StoreScpProcess, free_port, run_storescu, wait_until
from dicom_node import status
from tests.conftest import HIPPO_DICOM, SHARED_DATA

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EDGE = SHARED_DATA / "edge-cases"
GOOD = HIPPO_DICOM / "Study2" / "14_HCropVolume"


@pytest.fixture
def node(tmp_path: Path, storescp: StoreScpProcess) -> Iterator[NodeProcess]:
    config: dict[str, Any] = {
        "analyses": {
            "hippocampus": {"plugin": "hippocampus"},
            "any-series": {"plugin": "tests.integration.permissive_plugin:AnySeriesHippocampus",
                           "series_numbers": {"seg": 9911, "sc": 9912, "sr": 9913}},
        },
        "grouping": {"quiet_period_s": 2.0},
    }
    process = NodeProcess(tmp_path / "node", port=free_port(),
                          destinations={"pacs": (storescp.aet, storescp.host, storescp.port)}, config=config)
    process.start()
    yield process
    process.stop()
    print(process.log_text()[-8000:])


def copy_series(folder: Path, *, count: int | None = None, truncate: bool = False) -> list[Path]:
    """A copy of a real crop series under new UIDs: its first ``count`` images, and with
    ``truncate`` its pixel data cut short (as after a broken transfer)."""
    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    paths = []
    for source in sorted(GOOD.glob("*.dcm"))[:count]:
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if truncate:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def send_without_study_uid() -> int:
    ds = pydicom.dcmread(next(GOOD.glob("*.dcm")))
    del ds.StudyInstanceUID
    return ds


def jobs_by_series(node: NodeProcess) -> dict[tuple[str, str | None], dict[str, Any]]:
    return {(j.analysis, j.series_uid): j for j in node.ledger().job_rows(limit=1000)}


def series_uid_of(folder: Path) -> str:
    first = next(p for p in sorted(folder.rglob("*")) if p.is_file())
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def test_bad_input_fails_clearly_and_good_study_completes(
    tmp_path: Path, node: NodeProcess, storescp: StoreScpProcess
) -> None:
    truncated = copy_series(tmp_path / "truncated", truncate=True)
    few = copy_series(tmp_path / "few", count=5)
    bad_folders = [
        EDGE / "failing" / "gantrytilting",
        EDGE / "failing" / "sliceincrement" / "001",
        EDGE / "failing" / "slicecount",
        EDGE / "philips_enhanced" / "anatomical" / "001",
        EDGE / "generic" / "compressed_j2k",
    ]
    errors: list[BaseException] = []

    def send(paths: list[Path]) -> None:
        try:  # -xv: also propose JPEG 2000, so compressed files go as they are
            run_storescu(paths, node.port, called_aet="DICOMNODE", extra_args=("-xv",))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=([GOOD],))]
    threads += [threading.Thread(target=send, args=([folder],)) for folder in bad_folders]
    threads += [threading.Thread(target=send, args=(few,))]
    for thread in threads:
        thread.start()
    # an instance without a StudyInstanceUID is refused at once, with the reason
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    rsp = assoc.send_c_store(send_without_study_uid())
    assoc.release()
    assert rsp.Status == status.INVALID_IDENTIFIERS
    assert rsp.ErrorComment == "StudyInstanceUID is missing"
    # a series whose pixel data is cut short is refused at the door, with the reason
    with pytest.raises(RuntimeError, match="storescu exited"):
        run_storescu(truncated, node.port, called_aet="DICOMNODE")
    for thread in threads:
        thread.join(timeout=120)
    assert not errors

    good_series = series_uid_of(GOOD)

    def settled() -> bool:
        jobs = node.ledger().job_rows(limit=1000)
        # 7 studies (the good one, five edge cases, the short series), two analyses each
        return len(jobs) == 14 and all(
            j.state in ("done", "failed", "not_applicable") for j in jobs
        ) and any(d.state == "sent" for j in jobs for d in j.deliveries)

    wait_until(settled, deadline_s=180, what="every job finished", poll_s=0.5)
    jobs = jobs_by_series(node)
    good = jobs[("hippocampus", good_series)]
    assert good.state == "done"
    assert [d.state for d in good.deliveries] == ["sent"]

    def reason(folder: Path) -> str:
        return str(jobs[("any-series", series_uid_of(folder))].reason)

    assert "gantry tilt or sheared stack" in reason(EDGE / "failing" / "gantrytilting")
    assert "slice(s) missing" in reason(EDGE / "failing" / "sliceincrement" / "001")
    assert "enhanced multi-frame images are not supported" in reason(EDGE / "philips_enhanced" / "anatomical" / "001")
    # JPEG 2000 decodes; this series lacks the FrameOfReferenceUID its IOD requires, which a SEG
    # must reference: the job says so instead of filing an object that breaks the standard
    j2k = jobs[("any-series", series_uid_of(EDGE / "generic" / "compressed_j2k"))]
    assert j2k.state == "failed"
    assert j2k.reason.startswith("StudyNotProcessable: results cannot reference this series")
    assert "Frame Of Reference UID" in j2k.reason
    truncated_series = series_uid_of(tmp_path / "truncated")
    assert not [key for key in jobs if key[1] == truncated_series]
    assert not node.ledger().series_of_study(str(pydicom.dcmread(truncated[0]).StudyInstanceUID))
    # the default analysis says why the other studies were not for it
    not_applicable = [j.reason for j in node.ledger().job_rows(limit=1000)
                      if j.analysis == "hippocampus" and j.state == "not_applicable"]
    assert any("modality CT is not MR" in r for r in not_applicable)
    assert any("5 slices, fewer than the minimum of 20" in r for r in not_applicable)
    assert any("description does not match" in r for r in not_applicable)
    # the reasons are in the log too, one line per job
    log = node.log_text()
    assert "gantry tilt or sheared stack" in log and "outcome=failed" in log
    assert "Pixel Data is " in log and "its attributes imply" in log
    assert "Traceback" not in log
