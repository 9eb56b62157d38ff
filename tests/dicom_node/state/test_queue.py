"""The job queue in PostgreSQL: a job's ledger row and its procrastinate entry commit together; stalled jobs come back."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'dicom-node[postgresql]')")

from dicom_node.config import StateSettings, build_config  # noqa: E402
from dicom_node.state.ledger import open_ledger, upgrade_ledger  # noqa: E402
from dicom_node.state.postgres import PostgresLedger  # noqa: E402
from dicom_node.state.queue import TASK_NAME, device_class, job_queues, worker_queues  # noqa: E402
from dicom_node.state.records import InstanceRecord, PlannedJob  # noqa: E402
from tests.postgres import Cluster  # noqa: E402

SERIES = {
    "modality": "MR", "description": "HippoCrop", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "manufacturer": "", "rows": 51, "columns": 35, "orientation": "[1,0,0,0,1,0]",
    "pixel_spacing": "[1,1]", "slice_thickness": 1.0, "number_of_frames": None,
}
CONFIG = build_config({"analyses": {
    "hippocampus": {"plugin": "hippocampus"},
    "gpu-only": {"plugin": "hippocampus", "devices": ["cuda"]},
}})
_names = itertools.count()


def record(sop: str, study: str = "1.2", series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop, series, study, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"/spool/{sop}.dcm", 1000, "ORTHANC", 1.0)


@pytest.fixture
def admin(postgres_cluster: Cluster, tmp_path: Path) -> Iterator[tuple[PostgresLedger, psycopg.Connection[Any]]]:
    """A ledger in queue mode and a plain connection to look at procrastinate's tables."""
    dsn = postgres_cluster.create_database(f"queue_{next(_names)}")
    state = StateSettings(backend="postgresql", dsn=dsn)
    environ = {"DICOM_NODE_DB_PASSWORD": postgres_cluster.password}
    upgrade_ledger(tmp_path, state, environ=environ)
    ledger = open_ledger(tmp_path, state, environ=environ, queues=job_queues(CONFIG))
    assert isinstance(ledger, PostgresLedger)
    with psycopg.connect(dsn, password=postgres_cluster.password, autocommit=True) as db:
        yield ledger, db
    ledger.close()


def entries(db: psycopg.Connection[Any]) -> list[tuple[str, str, str]]:
    rows = db.execute("SELECT queueing_lock, queue_name, status::text FROM procrastinate_jobs"
                      " WHERE task_name = %s ORDER BY id", (TASK_NAME,)).fetchall()
    return [(str(a), str(b), str(c)) for a, b, c in rows]


def test_queues_follow_the_device_classes() -> None:
    assert job_queues(CONFIG)["hippocampus"] == "hippocampus@any"
    assert job_queues(CONFIG)["gpu-only"] == "gpu-only@cuda"
    assert "gpu-only@cuda" not in worker_queues(CONFIG, "cpu")
    assert {"hippocampus@any", "gpu-only@cuda"} <= set(worker_queues(CONFIG, "cuda"))
    assert device_class("cuda:1") == "cuda" and device_class("cpu") == "cpu"
    with pytest.raises(ValueError, match="'gpu' is not 'cpu', 'cuda' or 'cuda:N'"):
        device_class("gpu")


def test_every_queued_job_is_deferred_once_with_its_uid_as_queueing_lock(
    admin: tuple[PostgresLedger, psycopg.Connection[Any]]
) -> None:
    ledger, db = admin
    ledger.record_instance(record("1.2.3.1"), SERIES)
    uids = ledger.complete_study("1.2", 10.0, [
        PlannedJob("hippocampus", "1.2.3"), PlannedJob("gpu-only", "1.2.3"),
        PlannedJob("body", None, "not_applicable", "no CT"),
    ])
    assert entries(db) == [(uids[0], "hippocampus@any", "todo"), (uids[1], "gpu-only@cuda", "todo")]
    job = ledger.start_job(uids[0], 11.0)
    assert job is not None and job.state == "running" and job.attempts == 1
    ledger.finish_job(job.id, 12.0, state="failed", reason="boom")
    db.execute("UPDATE procrastinate_jobs SET status = 'succeeded' WHERE queueing_lock = %s", (uids[0],))
    assert ledger.retry_job(uids[0])
    assert ledger.finish_job(job.id, 13.0, state="failed", reason="again") == "failed"
    assert ledger.retry_job(uids[0])  # queued again while its entry still waits: no second entry
    assert [e for e in entries(db) if e[2] == "todo"] == [
        (uids[1], "gpu-only@cuda", "todo"), (uids[0], "hippocampus@any", "todo")]
    assert ledger.cancel_job(uids[1], 14.0) == "cancelled"
    assert (uids[1], "gpu-only@cuda", "cancelled") in entries(db)
    assert ledger.start_job(uids[1], 15.0) is None  # a worker that took it anyway skips it
    assert ledger.queue_depths(30) == {"hippocampus@any": depth(todo=1)}


def depth(**counts: int) -> dict[str, int]:
    return {"todo": 0, "doing": 0, "stalled": 0, "retrying": 0, "dead": 0, **counts}


def test_a_job_is_never_recorded_without_its_queue_entry(
    admin: tuple[PostgresLedger, psycopg.Connection[Any]]
) -> None:
    """The queue refuses the entry: the study stays receiving and no job row is left behind."""
    ledger, db = admin
    ledger.record_instance(record("1.2.3.1"), SERIES)
    db.execute("ALTER FUNCTION procrastinate_defer_jobs_v1(procrastinate_job_to_defer_v1[])"
               " RENAME TO defer_jobs_away")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        ledger.complete_study("1.2", 10.0, [PlannedJob("hippocampus", "1.2.3")])
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving"
    assert ledger.job_rows() == [] and entries(db) == []
    db.execute("ALTER FUNCTION defer_jobs_away(procrastinate_job_to_defer_v1[])"
               " RENAME TO procrastinate_defer_jobs_v1")
    (uid,) = ledger.complete_study("1.2", 11.0, [PlannedJob("hippocampus", "1.2.3")])
    assert entries(db) == [(uid, "hippocampus@any", "todo")]


def test_jobs_of_a_silent_worker_are_queued_again_once(
    admin: tuple[PostgresLedger, psycopg.Connection[Any]]
) -> None:
    ledger, db = admin
    for n in (1, 2):
        ledger.record_instance(record(f"1.{n}.3.1", study=f"1.{n}", series=f"1.{n}.3"), SERIES)
        ledger.complete_study(f"1.{n}", 10.0, [PlannedJob("hippocampus", f"1.{n}.3")])
    silent = db.execute("INSERT INTO procrastinate_workers (last_heartbeat)"
                        " VALUES (now() - interval '5 minutes') RETURNING id").fetchone()
    alive = db.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id").fetchone()
    assert silent is not None and alive is not None
    taken = []
    for worker in (silent[0], alive[0]):
        row = db.execute("SELECT queueing_lock FROM procrastinate_fetch_job_v2(%s::varchar[], %s)",
                         (["hippocampus@any"], worker)).fetchone()
        assert row is not None
        taken.append(str(row[0]))
        assert ledger.start_job(taken[-1], 11.0) is not None
    ledger.register_worker(alive[0], host="gpu-host-2", device="cuda:1", analyses=["hippocampus"],
                           pid=4242, now=11.0)
    fleet = {w["id"]: w for w in ledger.workers(30)}
    assert fleet[silent[0]]["silent"] and fleet[silent[0]]["host"] is None  # no identity recorded
    assert fleet[silent[0]]["job_uid"] == taken[0]
    busy = fleet[alive[0]]
    assert (busy["host"], busy["device"], busy["analyses"], busy["pid"], busy["silent"]) == (
        "gpu-host-2", "cuda:1", ["hippocampus"], 4242, False)
    study = ledger.job(taken[1])
    assert study is not None
    assert (busy["job_uid"], busy["study_uid"], busy["analysis"], busy["queue"]) == (
        taken[1], study.study_uid, "hippocampus", "hippocampus@any")
    assert ledger.queue_depths(30) == {"hippocampus@any": depth(doing=2, stalled=1)}
    assert ledger.recover_stalled(stalled_after_s=30) == [taken[0]]
    assert ledger.recover_stalled(stalled_after_s=30) == []  # recovered once
    job = ledger.job(taken[0])
    assert job is not None and job.state == "queued"
    other = ledger.job(taken[1])
    assert other is not None and other.state == "running"  # its worker is alive
    assert ledger.queue_depths(30) == {"hippocampus@any": depth(todo=1, doing=1, retrying=1)}
    assert ledger.forget_workers(silent_for_s=240) == [silent[0]]  # gone long ago
    assert ledger.forget_workers(silent_for_s=240) == []
    assert [w["id"] for w in ledger.workers(30)] == [alive[0]]
    db.execute("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
               " WHERE id = %s", (alive[0],))
    assert ledger.forget_workers(silent_for_s=240) == [alive[0]]
    assert db.execute("SELECT count(*) FROM fleet_workers").fetchone() == (0,)  # its identity went too
    assert ledger.queue_depths(30) == {"hippocampus@any": depth(todo=1, doing=1, stalled=1, retrying=1)}
    again = ledger.start_job(taken[0], 12.0)
    assert again is not None and again.attempts == 2


def test_a_job_the_queue_gave_up_on_is_dead(admin: tuple[PostgresLedger, psycopg.Connection[Any]]) -> None:
    ledger, db = admin
    ledger.record_instance(record("1.2.3.1"), SERIES)
    (uid,) = ledger.complete_study("1.2", 10.0, [PlannedJob("hippocampus", "1.2.3")])
    assert ledger.start_job(uid, 11.0) is not None
    db.execute("UPDATE procrastinate_jobs SET status = 'failed', attempts = 100 WHERE queueing_lock = %s", (uid,))
    assert ledger.queue_depths(30) == {"hippocampus@any": depth(dead=1)}  # the ledger still has it running
    job = ledger.job(uid)
    assert job is not None
    ledger.finish_job(job.id, 12.0, state="failed", reason="given up")
    assert ledger.queue_depths(30) == {}


def test_metrics_show_the_queue_and_the_workers(admin: tuple[PostgresLedger, psycopg.Connection[Any]]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from dicom_node.service.metrics import NodeMetrics

    ledger, db = admin
    ledger.record_instance(record("1.2.3.1"), SERIES)
    ledger.complete_study("1.2", 10.0, [PlannedJob("gpu-only", "1.2.3")])
    (worker,) = db.execute("INSERT INTO procrastinate_workers (last_heartbeat)"
                           " VALUES (now() - interval '42 seconds') RETURNING id").fetchall()
    ledger.register_worker(worker[0], host="cpu-host", device="cpu", analyses=["hippocampus"], pid=7, now=1.0)
    text = NodeMetrics(ledger, lambda: {}, stalled_after_s=30).render().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("dicom_node_queue_jobs", (("queue", "gpu-only@cuda"), ("status", "todo")))] == 1
    assert samples[("dicom_node_workers", ())] == 1
    (age,) = [v for (name, _), v in samples.items() if name == "dicom_node_worker_heartbeat_age_seconds"]
    assert 41 <= age < 60
    labels = {"worker": str(worker[0]), "host": "cpu-host", "device": "cpu", "pid": "7"}
    assert samples[("dicom_node_worker_busy", tuple(sorted({**labels, "analysis": ""}.items())))] == 0
