"""The job queue of the scaled-out mode: procrastinate's tables, written in the ledger's own transactions.

A queued job is a ledger row *and* a procrastinate job (task :data:`TASK_NAME`, argument
the job uid, queueing lock the job uid). Both are written by the same PostgreSQL
transaction, through procrastinate's own SQL function (``procrastinate_defer_jobs_v1``, what
``App.defer`` runs), so a crash never leaves a job recorded but not queued, and the queueing
lock refuses a second entry of the same job while one waits. Queues are per analysis and
device class: ``<analysis>@cuda`` (only a CUDA worker may run it), ``<analysis>@cpu``, or
``<analysis>@any``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from dicom_node.config import NodeConfig

if TYPE_CHECKING:  # psycopg is optional: one box imports this module without it
    import psycopg

#: The procrastinate task every queued job runs.
TASK_NAME = "dicom_node.run_job"

DeviceClass = Literal["cuda", "cpu"]


def queue_name(analysis: str, devices: Iterable[str]) -> str:
    """Return the queue of an analysis allowed on ``devices`` (``cuda``, ``cpu`` or both)."""
    allowed = set(devices)
    if allowed == {"cuda"}:
        return f"{analysis}@cuda"
    if allowed == {"cpu"}:
        return f"{analysis}@cpu"
    return f"{analysis}@any"


def job_queues(config: NodeConfig) -> dict[str, str]:
    """Return the queue of every analysis and task the configuration enables."""
    return {name: queue_name(name, settings.devices) for name, settings in config.runnable().items()}


def worker_queues(config: NodeConfig, device_class: DeviceClass) -> list[str]:
    """Return the queues a worker of ``device_class`` takes jobs from: its analyses, its device."""
    return sorted(
        queue_name(name, settings.devices)
        for name, settings in config.runnable().items()
        if device_class in settings.devices
    )


def device_class(device: str) -> DeviceClass:
    """Return the class of a torch device name: ``cuda:1`` is ``cuda``, ``cpu`` is ``cpu``.

    Raises
    ------
    ValueError
        If ``device`` is neither.
    """
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:") and device[5:].isdigit():
        return "cuda"
    raise ValueError(f"device {device!r} is not 'cpu', 'cuda' or 'cuda:N'")


def defer(db: psycopg.Connection[Any], job_uid: str, queue: str) -> bool:
    """Queue a job inside the caller's transaction; return ``False`` when it already waits.

    Runs in a savepoint, so a refused second entry (the queueing lock) leaves the caller's
    transaction intact.
    """
    from psycopg import errors

    try:
        with db.transaction():
            db.execute(
                "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW(%s, %s, 0, NULL, %s, %s::jsonb, NULL)"
                "::procrastinate_job_to_defer_v1])",
                (queue, TASK_NAME, job_uid, json.dumps({"job_uid": job_uid})),
            )
    except errors.UniqueViolation:
        return False
    return True


def queue_of(queues: Mapping[str, str], analysis: str) -> str:
    """Return the queue of ``analysis``: configured, or one any worker serving it may take."""
    return queues.get(analysis) or queue_name(analysis, ("cuda", "cpu"))


#: Running jobs whose worker stopped sending heartbeats (or unregistered), oldest first.
STALLED_JOBS = """
SELECT job.id, job.queueing_lock AS job_uid
  FROM procrastinate_jobs job
  LEFT JOIN procrastinate_workers worker ON worker.id = job.worker_id
 WHERE job.status = 'doing' AND job.task_name = %(task)s
   AND (job.worker_id IS NULL
        OR worker.last_heartbeat < now() - make_interval(secs => %(after_s)s))
 ORDER BY job.id
   FOR UPDATE OF job SKIP LOCKED
"""


def requeue_stalled(db: psycopg.Connection[Any], stalled_after_s: float) -> list[str]:
    """Put the queue entries of stalled workers' jobs back to waiting; return their job uids.

    The caller's transaction also moves the ledger rows back to queued. A job whose uid
    already waits (queued again by hand) is marked failed in the queue instead.
    """
    from psycopg import errors

    rows = db.execute(STALLED_JOBS, {"task": TASK_NAME, "after_s": stalled_after_s}).fetchall()
    requeued = []
    for row in rows:
        job_id, job_uid = (row["id"], row["job_uid"]) if isinstance(row, dict) else row
        try:
            with db.transaction():
                db.execute("SELECT procrastinate_retry_job_v2(%s, now(), NULL, NULL, NULL)", (job_id,))
        except errors.UniqueViolation:
            db.execute("UPDATE procrastinate_jobs SET status = 'failed' WHERE id = %s", (job_id,))
            continue
        requeued.append(str(job_uid))
    return requeued


def queue_depths(db: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    """Return, per queue, how many jobs wait (``todo``) and run (``doing``)."""
    rows = db.execute(
        "SELECT queue_name, status::text AS status, count(*) AS n FROM procrastinate_jobs"
        " WHERE task_name = %s AND status IN ('todo', 'doing') GROUP BY queue_name, status",
        (TASK_NAME,),
    ).fetchall()
    depths: dict[str, dict[str, int]] = {}
    for row in rows:
        name, status, count = (row["queue_name"], row["status"], row["n"]) if isinstance(row, dict) else row
        depths.setdefault(name, {"todo": 0, "doing": 0})[status] = int(count)
    return depths


def workers(db: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Return every registered worker: its id, seconds since its heartbeat, its current job."""
    rows = db.execute(
        "SELECT w.id, extract(epoch FROM now() - w.last_heartbeat) AS heartbeat_age_s,"
        " j.queueing_lock AS job_uid, j.queue_name FROM procrastinate_workers w"
        " LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing'"
        "  AND j.task_name = %s ORDER BY w.id",
        (TASK_NAME,),
    ).fetchall()
    return [
        {"id": int(row["id"]), "heartbeat_age_s": round(float(row["heartbeat_age_s"]), 1),
         "job_uid": row["job_uid"], "queue": row["queue_name"]}
        for row in rows
    ]
