"""Requested jobs in the ledger: API jobs, cancellation, retry, and migration of a version 1 ledger."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dicom_node.state.schema import SCHEMA_VERSION

from dicom_node.state.ledger import Ledger
from dicom_node.state.records import InstanceRecord, PlannedJob

from dicom_node.state.sqlite import SqliteLedger

SERIES = {
    "modality": "MR", "description": "HippoCrop", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "manufacturer": "", "rows": 51, "columns": 35, "orientation": "[1,0,0,0,1,0]",
    "pixel_spacing": "[1,1]", "slice_thickness": 1.0, "number_of_frames": None,
}


def record(sop: str, at: float, origin: str = "dicom") -> InstanceRecord:
    return InstanceRecord(sop, "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"/spool/{sop}.dcm", 1000, "ORTHANC", at, origin)


def test_api_jobs_may_repeat_and_complete_the_study(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 10.0, "api"), SERIES)
    first = ledger.create_job("1.2", PlannedJob("gaussian-blur", "1.2.3"), 11.0, origin="api",
                              options={"sigma_mm": [1, 1, 1]}, complete=True)
    second = ledger.create_job("1.2", PlannedJob("gaussian-blur", "1.2.3"), 12.0, origin="api",
                               options={"sigma_mm": [2, 2, 2]})
    assert first != second
    study = ledger.study("1.2")
    assert study is not None and study.state == "complete" and study.origin == "api"
    assert ledger.studies_due(1e9, 0, 1) == []  # no configured analyses run on it
    jobs = ledger.job_rows(analysis="gaussian-blur", origin="api")
    assert [j.options["sigma_mm"][0] for j in jobs] == [2, 1]
    claimed = ledger.claim_next_job(13.0, ["gaussian-blur"])
    assert claimed is not None and claimed.options == {"sigma_mm": [1, 1, 1]}
    with pytest.raises(KeyError):
        ledger.create_job("9.9", PlannedJob("gaussian-blur", None), 1.0, origin="api")


def test_planned_jobs_stay_unique_and_inherit_the_watch_origin(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 10.0, "watch"), SERIES)
    ledger.complete_study("1.2", 20.0, [PlannedJob("hippocampus", "1.2.3")] * 2)
    (job,) = ledger.job_rows()
    assert job.origin == "watch"


def test_cancel_queued_at_once_and_running_when_it_ends(ledger: Ledger) -> None:
    ledger.record_instance(record("1.2.3.1", 10.0), SERIES)
    running = ledger.create_job("1.2", PlannedJob("a", "1.2.3"), 11.0, origin="api")
    queued = ledger.create_job("1.2", PlannedJob("a", "1.2.3"), 11.0, origin="api")
    job = ledger.claim_next_job(12.0, ["a"])
    assert job is not None and job.uid == running
    assert ledger.cancel_job(queued, 13.0) == "cancelled"
    assert ledger.cancel_job(running, 13.0) == "running"
    state = ledger.finish_job(job.id, 14.0, state="done", deliveries=[("pacs", ["/r/x.dcm"])])
    assert state == "cancelled" and ledger.due_deliveries(100.0) == []
    assert "discarded" in getattr(ledger.job(running), "reason", "")
    assert ledger.cancel_job("no-such-job", 1.0) is None
    assert ledger.retry_job(running)
    again = ledger.claim_next_job(15.0, ["a"])
    assert again is not None and ledger.finish_job(again.id, 16.0, state="done") == "done"


def test_version_1_ledger_is_migrated_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, generation INTEGER NOT NULL
            DEFAULT 1, first_received_at REAL NOT NULL, last_received_at REAL NOT NULL, completed_at REAL);
        INSERT INTO studies VALUES ('1.2', 'complete', 1, 1.0, 2.0, 3.0);
        CREATE TABLE jobs (id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, study_uid TEXT NOT NULL,
            analysis TEXT NOT NULL, series_uid TEXT, generation INTEGER NOT NULL, origin TEXT NOT NULL
            DEFAULT 'dicom', state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, timings TEXT NOT NULL DEFAULT '{}',
            result_dir TEXT, summary TEXT NOT NULL DEFAULT '{}',
            UNIQUE (study_uid, analysis, series_uid, generation));
        INSERT INTO jobs (id, uid, study_uid, analysis, series_uid, generation, state, created_at)
            VALUES (7, 'old-job', '1.2', 'hippocampus', '1.2.3', 1, 'done', 3.0);
        CREATE TABLE deliveries (id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs (id),
            destination TEXT NOT NULL, files TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL
            DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT, sent_at REAL, UNIQUE (job_id, destination));
        INSERT INTO deliveries (job_id, destination, files, state, next_attempt_at)
            VALUES (7, 'pacs', '["/r/seg.dcm"]', 'sent', 3.0);
    """)
    db.commit()
    db.close()
    ledger = SqliteLedger(path)
    job = ledger.job("old-job")
    assert job is not None and job.options == {} and job.deliveries[0].state == "sent"
    assert getattr(ledger.study("1.2"), "origin", None) == "dicom"
    ledger.create_job("1.2", PlannedJob("hippocampus", "1.2.3"), 5.0, origin="api")  # no UNIQUE clash
    version = ledger._connection().execute("SELECT value FROM meta WHERE key = 'schema_version'")
    assert json.loads(version.fetchone()[0]) == SCHEMA_VERSION
    assert SqliteLedger(path).job("old-job") is not None  # opening again changes nothing


def test_version_2_ledger_gains_the_series_kernel(tmp_path: Path) -> None:
    import sqlite3

    from dicom_node.state.sqlite import SqliteLedger

    path = tmp_path / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE series (series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL,"
               " modality TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',"
               " sop_class_uid TEXT NOT NULL DEFAULT '', manufacturer TEXT NOT NULL DEFAULT '',"
               " rows INTEGER, columns INTEGER, orientation TEXT, pixel_spacing TEXT,"
               " slice_thickness REAL, number_of_frames INTEGER)")
    db.execute("INSERT INTO series (series_uid, study_uid, modality) VALUES ('1.2.3', '1.2', 'CT')")
    db.commit()
    db.close()
    ledger = SqliteLedger(path)
    row = ledger._connection().execute("SELECT modality, convolution_kernel FROM series").fetchone()
    assert tuple(row) == ("CT", "")
