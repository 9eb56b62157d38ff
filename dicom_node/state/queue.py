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


#: Per queue: jobs waiting, running, running on a silent worker (stalled), waiting again after
#: a failed attempt (retrying), and given up by the queue while the ledger still has them
#: queued or running, with no other entry waiting or running (dead).
QUEUE_DEPTHS = """
SELECT job.queue_name,
       count(*) FILTER (WHERE job.status = 'todo') AS todo,
       count(*) FILTER (WHERE job.status = 'doing') AS doing,
       count(*) FILTER (WHERE job.status = 'doing' AND (worker.id IS NULL
           OR worker.last_heartbeat < now() - make_interval(secs => %(after_s)s))) AS stalled,
       count(*) FILTER (WHERE job.status = 'todo' AND job.attempts > 0) AS retrying,
       count(*) FILTER (WHERE job.status = 'failed' AND ledger.state IN ('queued', 'running')
           AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs other
                            WHERE other.queueing_lock = job.queueing_lock
                              AND other.status IN ('todo', 'doing'))) AS dead
  FROM procrastinate_jobs job
  LEFT JOIN procrastinate_workers worker ON worker.id = job.worker_id
  LEFT JOIN jobs ledger ON ledger.uid = job.queueing_lock
 WHERE job.task_name = %(task)s AND job.status IN ('todo', 'doing', 'failed')
 GROUP BY job.queue_name
"""

DEPTH_KEYS = ("todo", "doing", "stalled", "retrying", "dead")


def queue_depths(db: psycopg.Connection[Any], stalled_after_s: float) -> dict[str, dict[str, int]]:
    """Return, per queue with any, jobs waiting, running, stalled, retrying and dead (:data:`QUEUE_DEPTHS`)."""
    rows = db.execute(QUEUE_DEPTHS, {"task": TASK_NAME, "after_s": stalled_after_s}).fetchall()
    depths: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = {key: int(row[key]) for key in DEPTH_KEYS}
        if any(counts.values()):
            depths[str(row["queue_name"])] = counts
    return depths


def register_worker(db: psycopg.Connection[Any], worker_id: int, *, host: str, device: str,
                    analyses: Iterable[str], pid: int, now: float) -> None:
    """Record who procrastinate's worker ``worker_id`` is: host, device, analyses served, pid.

    The row goes when procrastinate's goes (the worker stops, or :func:`forget_workers`).
    """
    db.execute(
        "INSERT INTO fleet_workers (worker_id, host, device, analyses, pid, started_at)"
        " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker_id) DO UPDATE SET host = EXCLUDED.host,"
        " device = EXCLUDED.device, analyses = EXCLUDED.analyses, pid = EXCLUDED.pid,"
        " started_at = EXCLUDED.started_at",
        (worker_id, host, device, json.dumps(sorted(analyses)), pid, now),
    )


def forget_workers(db: psycopg.Connection[Any], silent_for_s: float) -> list[int]:
    """Remove the workers silent for ``silent_for_s`` (gone long ago); return their ids.

    procrastinate's own pruning (what a starting worker does with its stalled ones); their
    identities in ``fleet_workers`` go with them, and jobs they held keep no worker (which
    :data:`STALLED_JOBS` counts as stalled).
    """
    rows = db.execute("SELECT worker_id FROM procrastinate_prune_stalled_workers_v1(%s)",
                      (silent_for_s,)).fetchall()
    return sorted(int(row["worker_id"]) for row in rows)


def workers(db: psycopg.Connection[Any], stalled_after_s: float) -> list[dict[str, Any]]:
    """Return every registered worker: who it is, its heartbeat, its current job.

    Each: ``id`` (procrastinate's), ``host``, ``device``, ``analyses``, ``pid``,
    ``started_at`` (``None`` until the worker recorded them), ``heartbeat_age_s``,
    ``silent`` (no heartbeat for ``stalled_after_s``), and ``job_uid``, ``study_uid``,
    ``analysis``, ``queue`` of the job it runs (``None`` when idle).
    """
    rows = db.execute(
        "SELECT w.id, extract(epoch FROM now() - w.last_heartbeat) AS heartbeat_age_s,"
        " f.host, f.device, f.analyses, f.pid, f.started_at,"
        " j.queueing_lock AS job_uid, j.queue_name, l.study_uid, l.analysis"
        " FROM procrastinate_workers w"
        " LEFT JOIN fleet_workers f ON f.worker_id = w.id"
        " LEFT JOIN procrastinate_jobs j ON j.worker_id = w.id AND j.status = 'doing'"
        "  AND j.task_name = %s"
        " LEFT JOIN jobs l ON l.uid = j.queueing_lock ORDER BY w.id",
        (TASK_NAME,),
    ).fetchall()
    shown = []
    for row in rows:
        age = round(float(row["heartbeat_age_s"]), 1)
        shown.append({
            "id": int(row["id"]), "host": row["host"], "device": row["device"],
            "analyses": json.loads(row["analyses"]) if row["analyses"] is not None else [],
            "pid": row["pid"], "started_at": row["started_at"], "heartbeat_age_s": age,
            "silent": age > stalled_after_s, "job_uid": row["job_uid"],
            "study_uid": row["study_uid"], "analysis": row["analysis"], "queue": row["queue_name"],
        })
    return shown
