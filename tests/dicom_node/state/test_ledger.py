from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.state.ledger import Ledger
from dicom_node.state.records import InstanceRecord, PlannedJob

from dicom_node.state.sqlite import SqliteLedger
from tests.dicom_node.state.conftest import OpenLedger

SERIES = {
    "modality": "MR", "description": "HippoCrop", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "manufacturer": "", "rows": 51, "columns": 35, "orientation": "[1,0,0,0,1,0]",
    "pixel_spacing": "[1,1]", "slice_thickness": 1.0, "number_of_frames": None,
}


def record(sop: str, at: float, study: str = "1.2", series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop, series, study, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"/spool/{sop}.dcm", 1000, "ORTHANC", at)


def test_wal_mode(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    mode = ledger._connection().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_instances_group_into_a_study(ledger: Ledger) -> None:
    assert ledger.record_instance(record("1.2.3.1", 10.0), SERIES)
    assert ledger.record_instance(record("1.2.3.2", 11.0), SERIES)
    assert not ledger.record_instance(record("1.2.3.2", 12.0), SERIES)  # received again
    (info,) = ledger.series_of_study("1.2")
    assert info.instance_count == 2 and info.description == "HippoCrop"
    assert info.orientation == (1, 0, 0, 0, 1, 0)
    study = ledger.study("1.2")
    assert study is not None and study.last_received_at == 11.0


def test_due_by_quiet_period_or_max_wait(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    ledger.record_instance(record("1.2.3.2", 108.0), SERIES)
    assert ledger.studies_due(110.0, quiet_period_s=5, max_wait_s=60) == []
    assert ledger.studies_due(113.0, quiet_period_s=5, max_wait_s=60) == ["1.2"]
    assert ledger.studies_due(109.0, quiet_period_s=5, max_wait_s=9) == ["1.2"]


def test_job_life_cycle(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    (uid,) = ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    assert ledger.complete_study("1.2", 111.0, [PlannedJob("hippocampus", "1.2.3")]) == []
    job = ledger.claim_next_job(112.0, ["hippocampus"])
    assert job is not None and job.uid == uid and job.attempts == 1
    assert ledger.claim_next_job(112.0, ["hippocampus"]) is None
    state = ledger.finish_job(job.id, 113.0, state="done", timings={"infer": 0.5},
                              deliveries=[("pacs", ["/r/seg.dcm"])])
    assert state == "done"
    (delivery,) = ledger.due_deliveries(113.0)
    assert delivery.files == ("/r/seg.dcm",) and delivery.job_uid == uid


def test_running_jobs_are_requeued_after_a_crash(open_again: OpenLedger) -> None:
    first = open_again()
    first.record_instance(record("1.2.3.1", 100.0), SERIES)
    first.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    assert first.claim_next_job(111.0, ["hippocampus"]) is not None
    reopened = open_again()  # as after kill -9
    assert reopened.requeue_interrupted() == 1
    job = reopened.claim_next_job(120.0, ["hippocampus"])
    assert job is not None and job.attempts == 2


def test_late_instance_opens_a_new_generation_and_supersedes(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    running = ledger.claim_next_job(111.0, ["hippocampus"])
    assert running is not None
    assert ledger.record_instance(record("1.2.3.9", 112.0), SERIES)
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving" and study.generation == 2
    # the job of generation 1 finishes after the new instance arrived: nothing is sent
    assert ledger.finish_job(running.id, 113.0, state="done",
                             deliveries=[("pacs", ["/r/seg.dcm"])]) == "superseded"
    assert ledger.due_deliveries(200.0) == []
    (new_uid,) = ledger.complete_study("1.2", 120.0, [PlannedJob("hippocampus", "1.2.3")])
    job = ledger.claim_next_job(121.0, ["hippocampus"])
    assert job is not None and job.uid == new_uid and job.generation == 2


def test_pending_delivery_of_old_generation_is_superseded(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    job = ledger.claim_next_job(111.0, ["hippocampus"])
    assert job is not None
    ledger.finish_job(job.id, 112.0, state="done", deliveries=[("pacs", ["/r/seg.dcm"])])
    ledger.record_instance(record("1.2.3.9", 113.0), SERIES)
    ledger.complete_study("1.2", 120.0, [PlannedJob("hippocampus", "1.2.3")])
    assert ledger.due_deliveries(200.0) == []


def test_delivery_retry_and_dead_letter(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    (uid,) = ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    job = ledger.claim_next_job(111.0, ["hippocampus"])
    assert job is not None
    ledger.finish_job(job.id, 112.0, state="done", deliveries=[("pacs", ["/r/sr.dcm"])])
    (delivery,) = ledger.due_deliveries(112.0)
    ledger.delivery_failed(delivery.id, 112.0, "connection refused", retry_at=172.0)
    assert ledger.due_deliveries(171.0) == []
    (delivery,) = ledger.due_deliveries(172.0)
    ledger.delivery_failed(delivery.id, 172.0, "connection refused", retry_at=None)
    assert ledger.due_deliveries(10_000.0) == []
    shown = ledger.job(uid)
    assert shown is not None
    assert shown.deliveries[0].state == "dead"
    assert shown.deliveries[0].last_error == "connection refused"
    assert ledger.redeliver(500.0, uid) == 1
    (delivery,) = ledger.due_deliveries(500.0)
    ledger.delivery_succeeded(delivery.id, 501.0)
    assert ledger.counts().deliveries == {"sent": 1}


def test_not_applicable_jobs_carry_their_reason(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", None, "not_applicable", "no MR")])
    (job,) = ledger.job_rows()
    assert job.state == "not_applicable" and job.reason == "no MR"
    assert ledger.claim_next_job(111.0, ["hippocampus"]) is None


def test_study_is_not_completed_on_a_stale_plan(ledger: Ledger) -> None:
    """An instance recorded between planning and completing: the plan may lack its series."""
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    ledger.record_instance(record("1.2.4.1", 101.0, series="1.2.4"), SERIES)
    assert ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")],
                                 instances_seen=1) == []
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving"
    assert ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")],
                                 instances_seen=2)


def test_jobs_of_arrived_series_are_queued_while_the_study_keeps_receiving(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    (early,) = ledger.complete_study("1.2", 101.0, [PlannedJob("hippocampus", "1.2.3")], keep_receiving=True)
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving" and study.generation == 1
    job = ledger.claim_next_job(102.0, ["hippocampus", "t1"])
    assert job is not None and job.uid == early
    ledger.record_instance(record("1.2.4.1", 103.0, series="1.2.4"), SERIES)  # same generation
    # completing with the whole plan creates only the jobs not queued earlier
    (late,) = ledger.complete_study("1.2", 104.0, [PlannedJob("hippocampus", "1.2.3"), PlannedJob("t1", "1.2.4")],
                                    expected_instances=2)
    study = ledger.study("1.2")
    assert study is not None and study.state == "complete" and study.generation == 1
    assert {(j.analysis, j.series_uid, j.generation) for j in ledger.job_rows(study_uid="1.2")} == {
        ("hippocampus", "1.2.3", 1), ("t1", "1.2.4", 1)}
    job = ledger.claim_next_job(105.0, ["hippocampus", "t1"])
    assert job is not None and job.uid == late


def test_only_idle_studies_are_purged(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 100.0), SERIES)
    assert ledger.studies_to_purge(before=1000.0) == []  # still receiving
    ledger.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    assert ledger.studies_to_purge(before=1000.0) == []  # its job is queued
    job = ledger.claim_next_job(111.0, ["hippocampus"])
    assert job is not None
    assert ledger.studies_to_purge(before=1000.0) == []  # running
    ledger.finish_job(job.id, 200.0, state="done", deliveries=[("pacs", ["/r/sr.dcm"])])
    assert ledger.studies_to_purge(before=1000.0) == []  # its result is not sent yet
    (delivery,) = ledger.due_deliveries(200.0)
    ledger.delivery_failed(delivery.id, 201.0, "connection refused", retry_at=None)  # dead
    assert ledger.studies_to_purge(before=199.0) == []  # a job finished after the cut-off
    assert ledger.studies_to_purge(before=200.0) == ["1.2"]

    assert ledger.forget_instances("1.2", now=300.0) == 1
    assert ledger.series_of_study("1.2") == [] and ledger.recorded_paths() == set()
    study = ledger.study("1.2")
    assert study is not None and study.purged_at == 300.0 and study.state == "complete"
    assert ledger.studies_to_purge(before=1000.0) == []  # nothing left to purge
    assert ledger.job(job.uid) is not None  # the history stays

    # A late instance after the purge opens a new generation, as any late instance does.
    assert ledger.record_instance(record("1.2.3.9", 400.0), SERIES)
    study = ledger.study("1.2")
    assert study is not None and study.generation == 2 and study.purged_at is None
    (info,) = ledger.series_of_study("1.2")
    assert info.instance_count == 1


def test_schema_3_ledger_gains_purged_at(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.state.schema import SCHEMA

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    version_4 = SCHEMA.replace(",\n    expected_instances INTEGER", "")
    version_3 = version_4.replace(",\n    purged_at REAL", "")
    assert version_3 != version_4 != SCHEMA
    db.executescript(version_3)
    db.execute("INSERT INTO studies VALUES ('1.2', 'complete', 1, 1.0, 2.0, 3.0, 'dicom')")
    db.commit()
    db.close()
    study = SqliteLedger(path).study("1.2")
    assert study is not None and study.purged_at is None and study.completed_at == 3.0


def test_manifest_lists_sizes_and_digests(ledger: Ledger) -> None:
    from dataclasses import replace

    ledger.record_instance(replace(record("1.2.3.2", 10.0), sha256="b" * 64), SERIES)
    ledger.record_instance(replace(record("1.2.3.1", 11.0), sha256="a" * 64), SERIES)
    manifest = ledger.manifest("1.2.3")
    assert [m.sop_instance_uid for m in manifest] == ["1.2.3.1", "1.2.3.2"]
    assert manifest[0].to_json() == {"sop_instance_uid": "1.2.3.1", "size_bytes": 1000, "sha256": "a" * 64}
    assert manifest[0].path == "/spool/1.2.3.1.dcm"


def test_a_due_delivery_is_taken_by_one_sender(open_again: OpenLedger) -> None:
    first, second = open_again(), open_again()  # two receivers on one ledger
    first.record_instance(record("1.2.3.1", 100.0), SERIES)
    first.complete_study("1.2", 110.0, [PlannedJob("hippocampus", "1.2.3")])
    job = first.claim_next_job(111.0, ["hippocampus"])
    assert job is not None
    first.finish_job(job.id, 112.0, state="done", deliveries=[("pacs", ["/r/seg.dcm"])])
    (due,) = second.due_deliveries(112.0)
    assert first.claim_delivery(due.id, 112.0, lease_s=60)
    assert not second.claim_delivery(due.id, 112.0, lease_s=60)
    assert second.due_deliveries(150.0) == []  # taken for the lease
    (again,) = second.due_deliveries(172.0)  # its sender died: due again after the lease
    assert second.claim_delivery(again.id, 172.0, lease_s=60)
    second.delivery_succeeded(again.id, 173.0)
    assert not first.claim_delivery(again.id, 500.0, lease_s=60)  # sent: nothing to take
def test_schema_4_ledger_gains_expected_instances(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.state.schema import SCHEMA

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace(",\n    expected_instances INTEGER", ""))
    db.execute("INSERT INTO studies VALUES ('1.2', 'complete', 1, 1.0, 2.0, 3.0, 'dicom', NULL)")
    db.commit()
    db.close()
    ledger = SqliteLedger(path)
    columns = {row[1] for row in ledger._connection().execute("PRAGMA table_info(studies)")}
    assert "expected_instances" in columns
    study = ledger.study("1.2")
    assert study is not None and study.completed_at == 3.0 and study.generation == 1


def test_source_cursors_move_forward_and_survive_a_restart(open_again: OpenLedger) -> None:
    first, second = open_again(), open_again()  # two receivers pulling from one ledger
    assert first.source_cursor("pacs") is None
    first.set_source_cursor("pacs", 12, 1.0)
    first.set_source_cursor("pacs", 15, 2.0)
    assert first.source_cursor("pacs") == 15 and first.source_cursor("other") is None
    assert second.source_cursor("pacs") == 15
    second.set_source_cursor("other", 4, 3.0)
    assert first.source_cursor("other") == 4
    first.close()
    assert open_again().source_cursor("pacs") == 15  # durable: as after a restart


def test_source_cursor_on_a_ledger_older_than_its_table(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.state.schema import SCHEMA

    path = tmp_path / "old.sqlite3"  # a version 5 ledger, without the table
    db = sqlite3.connect(path)
    db.executescript(SCHEMA[: SCHEMA.index("CREATE TABLE IF NOT EXISTS source_cursors")])
    db.commit()
    db.close()
    old = SqliteLedger(path)
    assert old.source_cursor("pacs") is None
    old.set_source_cursor("pacs", 3, 1.0)
    assert old.source_cursor("pacs") == 3
