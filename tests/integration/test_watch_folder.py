"""The watch folder of a real node: half-written files wait, trees are ingested like C-STORE, junk is rejected."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import free_port, wait_until
from tests.conftest import HIPPO_CROP_STUDY1

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SETTLE_S = 1.0


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    config = {"watch": {"dir": str(tmp_path / "drop"), "rejected_dir": str(tmp_path / "rejected"),
                        "settle_s": SETTLE_S, "scan_interval_s": 0.2, "give_up_s": 4.0}}
    process = NodeProcess(tmp_path / "node", port=free_port(), destinations={}, config=config)
    process.start()
    yield process
    process.stop()
    print(process.log_text()[-5000:])


def test_partial_writes_wait_then_the_series_is_analysed_like_a_c_store(tmp_path: Path, node: NodeProcess) -> None:
    drop = tmp_path / "drop"
    files = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    data = files[0].read_bytes()
    target = drop / "slow-writer.dcm"
    chunks = [data[i: i + len(data) // 4 + 1] for i in range(0, len(data), len(data) // 4 + 1)]
    with target.open("wb") as handle:
        for index, chunk in enumerate(chunks):
            handle.write(chunk)
            handle.flush()
            # short pauses, then one longer than settle_s: only completeness keeps it out then
            time.sleep(SETTLE_S * 1.8 if index == 1 else SETTLE_S * 0.5)
            assert target.exists(), "a half-written file was taken"
            assert node.ledger().counts().instances == 0
    wait_until(lambda: not target.exists(), deadline_s=20, what="file ingested")
    (stored,) = node.ledger().recorded_paths()
    assert Path(stored).read_bytes() == data  # byte for byte, as a C-STORE would store it
    # the rest of the series as a folder tree, plus a file that is not DICOM
    shutil.copytree(HIPPO_CROP_STUDY1, drop / "export" / "series", ignore=shutil.ignore_patterns(files[0].name))
    (drop / "export" / "readme.txt").write_text("exported by a workstation")
    wait_until(lambda: node.ledger().counts().instances == 32, deadline_s=30, what="32 instances")
    job = wait_until(lambda: next((j for j in node.ledger().job_rows() if j.state in ("done", "failed")), None),
                     deadline_s=60, what="hippocampus job")
    assert job.state == "done" and job.origin == "watch" and job.analysis == "hippocampus"
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert job.study_uid == study_uid
    reason = wait_until(lambda: (p := tmp_path / "rejected" / "export" / "readme.txt.reason.txt").exists()
                        and p.read_text(), deadline_s=20, what="rejected with reason")
    assert "not a readable DICOM file" in reason
    assert (tmp_path / "rejected" / "export" / "readme.txt").read_text() == "exported by a workstation"
    assert list(drop.iterdir()) == []
