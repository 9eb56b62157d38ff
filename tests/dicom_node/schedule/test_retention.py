"""Spool retention: idle studies leave the spool; nothing comes back on restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from dicom_node.cli.main import main
from dicom_node.config import NodeConfig
from dicom_node.receive.recovery import recover_spool
from dicom_node.service.node import Node
from dicom_node.state.records import PlannedJob
from tests.conftest import HIPPO_CROP_STUDY1, FakeClock

DAY_S = 86400.0


def make_node(tmp_path: Path, clock: FakeClock, retention_days: float = 7) -> Node:
    config = NodeConfig.model_validate({
        "node": {"data_dir": str(tmp_path), "retention_days": retention_days, "min_free_disk_bytes": 0},
        "analyses": {},
    })
    return Node(config, clock=clock)


def receive_and_finish(node: Node, clock: FakeClock) -> tuple[str, list[Path]]:
    """Store the HippoCrop series as the SCP would, complete it and finish its job."""
    ingest = node.ingestor("watch")
    source = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    for path in source:
        ingest.ingest_file(path, origin="watch")
    ds = pydicom.dcmread(source[0], stop_before_pixels=True)
    study_uid, series_uid = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    clock.advance(20)
    node.ledger.complete_study(study_uid, clock(), [PlannedJob("hippocampus", series_uid)])
    job = node.ledger.claim_next_job(clock(), ["hippocampus"])
    assert job is not None
    node.ledger.finish_job(job.id, clock(), state="done", deliveries=[("pacs", ["/r/sr.dcm"])])
    (delivery,) = node.ledger.due_deliveries(clock())
    node.ledger.delivery_succeeded(delivery.id, clock())
    paths = node.ledger.instance_paths(series_uid)
    assert len(paths) == len(source) and all(p.is_file() for p in paths)
    return study_uid, paths


def test_an_idle_study_leaves_the_spool_and_is_not_recovered(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    node = make_node(tmp_path, clock)
    study_uid, paths = receive_and_finish(node, clock)
    clock.advance(6.9 * DAY_S)
    assert node.purge_expired() == 0
    assert all(p.is_file() for p in paths)
    clock.advance(0.2 * DAY_S)
    assert node.purge_expired() == 1
    assert not any(p.exists() for p in paths) and not (node.spool.root / study_uid).exists()
    study = node.ledger.study(study_uid)
    assert study is not None and study.purged_at == clock()
    assert node.ledger.job_rows()[0].state == "done"  # the history stays
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    assert f"{study_uid}  complete  generation 1  0 instance(s)  images deleted " in capsys.readouterr().out
    # A restart finds nothing to re-record: the study is not analysed again.
    assert recover_spool(node.spool, node.ledger, clock()) == 0
    assert node.purge_expired() == 0


def test_files_that_cannot_be_deleted_keep_their_ledger_rows(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    node = make_node(tmp_path, clock)
    study_uid, paths = receive_and_finish(node, clock)
    clock.advance(8 * DAY_S)

    def refuse(uid: str) -> None:
        raise PermissionError(13, "Permission denied", str(node.spool.root / uid))

    monkeypatch.setattr(node.spool, "remove_study", refuse)
    assert node.purge_expired() == 0
    assert node.ledger.recorded_paths() == {str(p) for p in paths}  # rows kept: files are there
    monkeypatch.undo()
    assert node.purge_expired() == 1


def test_a_crash_between_files_and_rows_is_finished_by_the_next_pass(tmp_path: Path) -> None:
    clock = FakeClock()
    node = make_node(tmp_path, clock)
    study_uid, _ = receive_and_finish(node, clock)
    clock.advance(8 * DAY_S)
    shutil.rmtree(node.spool.root / study_uid)  # files gone, rows not yet (the crash)
    assert recover_spool(node.spool, node.ledger, clock()) == 0
    assert node.purge_expired() == 1
    assert node.ledger.recorded_paths() == set()


def test_retention_zero_keeps_everything(tmp_path: Path) -> None:
    clock = FakeClock()
    node = make_node(tmp_path, clock, retention_days=0)
    _, paths = receive_and_finish(node, clock)
    clock.advance(1000 * DAY_S)
    assert node.purge_expired() == 0
    assert all(p.is_file() for p in paths)


def test_retrying_a_job_of_a_purged_study_fails_with_the_reason(tmp_path: Path) -> None:
    clock = FakeClock()
    node = make_node(tmp_path, clock)
    receive_and_finish(node, clock)
    clock.advance(8 * DAY_S)
    assert node.purge_expired() == 1
    (job,) = node.ledger.job_rows()
    assert node.ledger.retry_job(job.uid)
    claimed = node.ledger.claim_next_job(clock(), ["hippocampus"])
    assert claimed is not None and node.scheduler.prepare(claimed) is None
    failed = node.ledger.job(job.uid)
    assert failed is not None and failed.state == "failed"
    assert "deleted from the spool by retention" in failed.reason
