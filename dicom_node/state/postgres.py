"""The ledger in PostgreSQL: the scaled-out backend, shared by every host, every change one transaction.

Same semantics as :class:`dicom_node.state.sqlite.SqliteLedger`; where several processes
may race (two receivers recording the same study, two workers claiming jobs) the rows
involved are locked (``SELECT ... FOR UPDATE``, ``SKIP LOCKED`` when claiming) so that a
study completes once and a job is claimed once. The schema is created and migrated only by
:func:`upgrade_schema` (``dicom-node db upgrade``); opening a ledger whose schema is missing,
older or newer refuses with the command to run.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

from dicom_node.errors import ConfigError, LedgerUnavailable
from dicom_node.state import queue
from dicom_node.state.records import (
    DeliveryRecord,
    DeliveryState,
    DueDelivery,
    InstanceRecord,
    JobRecord,
    JobState,
    LedgerCounts,
    ManifestEntry,
    Origin,
    PlannedJob,
    SeriesInfo,
    StudyRecord,
    StudyState,
)
from dicom_node.state.rows import STUDY_SELECT, job_outcome, job_record, series_info, study_record
from dicom_node.state.postgres_schema import (
    Connection,
    connect,
    newer_message,
    procrastinate_version,
    queue_schema_version,
    safe_dsn,
    schema_version,
)
from dicom_node.state.schema import SCHEMA_VERSION, UPGRADE_COMMAND

logger = logging.getLogger(__name__)

class PostgresLedger:
    """The node's durable state in a PostgreSQL database shared by receivers and workers.

    Connections come from a pool shared by the node's threads and are checked as they are
    taken, so after the server went away (a restart, a failover) a call gets a fresh one; a
    call that was in progress when the server went fails with
    :class:`psycopg.OperationalError`. Every method is one transaction.

    Parameters
    ----------
    dsn
        ``postgresql://USER@HOST:PORT/DB`` (no password).
    password
        The password, from ``state.password_file`` or the environment, or ``None``.
    connect_timeout_s
        How long to wait for the server when connecting, and for a free connection.
    pool_size
        The most connections this process opens.
    queues
        The queue of each analysis (:func:`dicom_node.state.queue.job_queues`): every job
        that becomes queued is then also deferred to procrastinate in the same transaction,
        and workers take jobs from there (:meth:`start_job`) instead of
        :meth:`claim_next_job`. ``None``: jobs are claimed from the ledger only.

    Raises
    ------
    ConfigError
        If the server cannot be reached, or the schema is missing, older or newer than
        this node's (the message names the command to run).
    """

    def __init__(
        self, dsn: str, password: str | None = None, *, connect_timeout_s: float = 10.0,
        pool_size: int = 10, queues: Mapping[str, str] | None = None,
    ) -> None:
        self.dsn = dsn
        self.queues = None if queues is None else dict(queues)
        db = connect(dsn, password, connect_timeout_s=connect_timeout_s)
        try:
            version = schema_version(db)
            queue_version = queue_schema_version(db) if version is not None else None
        finally:
            db.close()
        if version is None:
            raise ConfigError(
                f"state.dsn: {safe_dsn(dsn)} holds no dicom-node ledger yet: run `{UPGRADE_COMMAND}`"
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(f"state.dsn: {safe_dsn(dsn)}: {newer_message(version)}")
        if version < SCHEMA_VERSION:
            raise ConfigError(
                f"state.dsn: {safe_dsn(dsn)} has ledger schema version {version}, this node needs"
                f" {SCHEMA_VERSION}: run `{UPGRADE_COMMAND}`"
            )
        if queue_version != procrastinate_version():
            raise ConfigError(
                f"state.dsn: {safe_dsn(dsn)} has the job queue of procrastinate {queue_version or 'unrecorded'},"
                f" this node has {procrastinate_version()}: run `{UPGRADE_COMMAND}`"
            )
        # A pool rather than a connection per thread: the SCP runs one thread per
        # association. Each connection is checked as it is taken, so after a server restart
        # the stale ones are replaced instead of failing the next call.
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            dsn, kwargs={"password": password, "autocommit": True, "row_factory": dict_row,
                         "connect_timeout": max(1, round(connect_timeout_s)),
                         "application_name": "dicom-node"},
            connection_class=Connection, min_size=1, max_size=pool_size,
            check=ConnectionPool.check_connection, timeout=connect_timeout_s,
            reconnect_timeout=24 * 3600.0, name="dicom-node-ledger", open=True,
        )

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A pooled connection; losing the server turns into :class:`LedgerUnavailable`."""
        try:
            with self._pool.connection() as db:
                yield db
        except psycopg.OperationalError as exc:  # includes the pool's timeout
            raise LedgerUnavailable(f"the ledger database cannot be reached: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """Run a block as one transaction (READ COMMITTED; rows locked where it matters)."""
        with self._connection() as db:
            with db.transaction():
                yield db

    def _fetch(self, query: str, params: Any = None) -> list[DictRow]:
        with self._connection() as db:
            return db.execute(query, params).fetchall()

    def _fetch_one(self, query: str, params: Any = None) -> DictRow | None:
        rows = self._fetch(query, params)
        return rows[0] if rows else None

    def close(self) -> None:
        """Close every connection of this ledger's pool."""
        self._pool.close()

    # -- instances -------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, series: dict[str, Any]) -> bool:
        """Record a stored instance and update its study; return whether it was new.

        A new instance of a complete study opens a new generation of that study. An
        instance received again (same SOP Instance UID) changes nothing but its file.

        Every instance of a study pays this, so the usual case takes two statements inside
        the transaction: the instance and its series in one, then the study's last arrival
        (which locks its row, as ``FOR UPDATE`` would). Only the first instance of a study,
        or one arriving after the study was completed, takes the longer path.
        """
        with self.transaction() as db:
            row = db.execute(
                "WITH instance AS (INSERT INTO instances (sop_instance_uid, series_uid, study_uid,"
                " sop_class_uid, transfer_syntax_uid, path, size_bytes, calling_ae_title,"
                " received_at, sha256) VALUES (%(sop_instance_uid)s, %(series_uid)s, %(study_uid)s,"
                " %(instance_sop_class_uid)s, %(transfer_syntax_uid)s, %(path)s, %(size_bytes)s,"
                " %(calling_ae_title)s, %(received_at)s, %(sha256)s) ON CONFLICT (sop_instance_uid)"
                " DO UPDATE SET series_uid = EXCLUDED.series_uid, study_uid = EXCLUDED.study_uid,"
                " sop_class_uid = EXCLUDED.sop_class_uid,"
                " transfer_syntax_uid = EXCLUDED.transfer_syntax_uid, path = EXCLUDED.path,"
                " size_bytes = EXCLUDED.size_bytes, calling_ae_title = EXCLUDED.calling_ae_title,"
                " received_at = EXCLUDED.received_at, sha256 = EXCLUDED.sha256"
                " RETURNING (xmax = 0) AS inserted),"  # xmax is 0 only for a fresh insert
                " new_series AS (INSERT INTO series (series_uid, study_uid, modality, description,"
                " sop_class_uid, manufacturer, \"rows\", \"columns\", orientation, pixel_spacing,"
                " slice_thickness, number_of_frames, convolution_kernel) VALUES (%(series_uid)s,"
                " %(study_uid)s, %(modality)s, %(description)s, %(sop_class_uid)s,"
                " %(manufacturer)s, %(rows)s, %(columns)s, %(orientation)s, %(pixel_spacing)s,"
                " %(slice_thickness)s, %(number_of_frames)s, %(convolution_kernel)s)"
                " ON CONFLICT (series_uid) DO NOTHING)"
                " SELECT inserted FROM instance",
                {"convolution_kernel": "", **series,
                 "sop_instance_uid": record.sop_instance_uid, "series_uid": record.series_uid,
                 "study_uid": record.study_uid, "instance_sop_class_uid": record.sop_class_uid,
                 "transfer_syntax_uid": record.transfer_syntax_uid, "path": record.path,
                 "size_bytes": record.size_bytes, "calling_ae_title": record.calling_ae_title,
                 "received_at": record.received_at, "sha256": record.sha256},
            ).fetchone()
            if row is None or not row["inserted"]:
                return False
            now = record.received_at
            receiving = db.execute(
                "UPDATE studies SET last_received_at = greatest(last_received_at, %s)"
                " WHERE study_uid = %s AND state <> 'complete' RETURNING study_uid",
                (now, record.study_uid),
            ).fetchone()
            if receiving is not None:
                return True
            created = db.execute(
                "INSERT INTO studies (study_uid, state, generation, first_received_at,"
                " last_received_at, origin) VALUES (%s, 'receiving', 1, %s, %s, %s)"
                " ON CONFLICT (study_uid) DO NOTHING RETURNING study_uid",
                (record.study_uid, now, now, record.origin),
            ).fetchone()
            if created is not None:
                return True
            study = db.execute(
                "SELECT state, expected_instances, (SELECT count(*) FROM instances i"
                " WHERE i.study_uid = st.study_uid) AS held FROM studies st WHERE study_uid = %s"
                " FOR UPDATE", (record.study_uid,)
            ).fetchone()
            announced = (study is not None and study["expected_instances"] is not None
                         and study["held"] <= study["expected_instances"])
            if study is not None and study["state"] == StudyState.COMPLETE and announced:
                # part of what the source announced when the study was completed from its
                # inventory (a series no analysis needed, still arriving): not a new generation
                pass
            elif study is not None and study["state"] == StudyState.COMPLETE:
                db.execute(
                    "UPDATE studies SET state = 'receiving', generation = generation + 1,"
                    " first_received_at = %s, last_received_at = %s, completed_at = NULL,"
                    " purged_at = NULL, expected_instances = NULL WHERE study_uid = %s",
                    (now, now, record.study_uid),
                )
            else:
                # completed, then opened again by another receiver since the first statement
                db.execute(
                    "UPDATE studies SET last_received_at = greatest(last_received_at, %s)"
                    " WHERE study_uid = %s",
                    (now, record.study_uid),
                )
            return True

    def recorded_paths(self) -> set[str]:
        """Return the spool paths of every recorded instance."""
        rows = self._fetch("SELECT path FROM instances")
        return {row["path"] for row in rows}

    def series_of_study(self, study_uid: str) -> list[SeriesInfo]:
        """Return the series of a study with their instance counts, in order of arrival."""
        rows = self._fetch(
            "SELECT s.*, (SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid)"
            " AS instance_count FROM series s WHERE s.study_uid = %s ORDER BY s.seq",
            (study_uid,),
        )
        return [series_info(row) for row in rows]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Return the spool paths of a series' instances."""
        rows = self._fetch(
            "SELECT path FROM instances WHERE series_uid = %s ORDER BY sop_instance_uid",
            (series_uid,),
        )
        return [Path(row["path"]) for row in rows]

    def manifest(self, series_uid: str) -> list[ManifestEntry]:
        """Return a series' instances with their sizes and SHA-256, ordered by SOP Instance UID."""
        rows = self._fetch(
            "SELECT sop_instance_uid, path, size_bytes, sha256 FROM instances WHERE series_uid = %s"
            " ORDER BY sop_instance_uid",
            (series_uid,),
        )
        return [ManifestEntry(r["sop_instance_uid"], r["path"], r["size_bytes"], r["sha256"]) for r in rows]

    # -- studies ---------------------------------------------------------------------

    def studies_due(self, now: float, quiet_period_s: float, max_wait_s: float) -> list[str]:
        """Return studies still receiving whose quiet period or maximum wait has passed."""
        rows = self._fetch(
            "SELECT study_uid FROM studies WHERE state = 'receiving'"
            " AND (last_received_at <= %s OR first_received_at <= %s) ORDER BY first_received_at",
            (now - quiet_period_s, now - max_wait_s),
        )
        return [row["study_uid"] for row in rows]

    def receiving_studies(self) -> dict[str, frozenset[str]]:
        """Return the studies still receiving, each with the calling AE titles that sent it."""
        callers: dict[str, set[str]] = {}
        for row in self._fetch(
            "SELECT DISTINCT st.study_uid, i.calling_ae_title FROM studies st JOIN instances i"
            " ON i.study_uid = st.study_uid WHERE st.state = 'receiving'"
        ):
            callers.setdefault(row["study_uid"], set()).add(row["calling_ae_title"])
        return {study: frozenset(titles) for study, titles in callers.items()}

    def complete_study(
        self, study_uid: str, now: float, planned: Sequence[PlannedJob], *,
        instances_seen: int | None = None, expected_instances: int | None = None,
        keep_receiving: bool = False,
    ) -> list[str]:
        """Mark a study complete and create its jobs in one transaction.

        The study's row is locked, so two receivers completing the same study create its
        jobs once. Jobs and undelivered results of earlier generations are superseded.
        When the study holds more instances than ``instances_seen`` nothing changes.
        ``expected_instances`` is how many instances the study's source announced: until the
        study holds more, arriving instances belong to this generation. With
        ``keep_receiving`` the jobs are created but the study stays receiving: the series
        they need arrived while other needed series are still arriving. Returns the new
        jobs' uids (a planned job that exists already is not created again).
        """
        created = []
        with self.transaction() as db:
            study = db.execute(
                "SELECT generation, state, origin FROM studies WHERE study_uid = %s FOR UPDATE",
                (study_uid,),
            ).fetchone()
            if study is None or study["state"] != StudyState.RECEIVING:
                return []
            if instances_seen is not None:
                count = db.execute(
                    "SELECT count(*) AS n FROM instances WHERE study_uid = %s", (study_uid,)
                ).fetchone()
                if count is None or count["n"] != instances_seen:
                    return []
            generation = study["generation"]
            if not keep_receiving:
                db.execute(
                    "UPDATE studies SET state = 'complete', completed_at = %s, expected_instances = %s"
                    " WHERE study_uid = %s",
                    (now, expected_instances, study_uid),
                )
            db.execute(
                "UPDATE jobs SET state = 'superseded', finished_at = %s,"
                " reason = 'new instances arrived; a newer analysis replaces this one'"
                " WHERE study_uid = %s AND generation < %s AND state = 'queued'",
                (now, study_uid, generation),
            )
            db.execute(
                "UPDATE deliveries SET state = 'superseded' WHERE state = 'pending' AND job_id IN"
                " (SELECT id FROM jobs WHERE study_uid = %s AND generation < %s)",
                (study_uid, generation),
            )
            origin = Origin.WATCH if study["origin"] == Origin.WATCH else Origin.DICOM
            for job in planned:
                uid = str(uuid.uuid4())
                inserted = db.execute(
                    "INSERT INTO jobs (uid, study_uid, analysis, series_uid, generation,"
                    " state, reason, created_at, finished_at, origin)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (
                        uid, study_uid, job.analysis, job.series_uid, generation, job.state,
                        job.reason, now, None if job.state == JobState.QUEUED else now, origin,
                    ),
                )
                if inserted.rowcount:
                    created.append(uid)
                    if job.state == JobState.QUEUED:
                        self._defer(db, uid, job.analysis)
        return created

    def create_job(
        self, study_uid: str, job: PlannedJob, now: float, *, origin: Origin,
        options: dict[str, Any] | None = None, complete: bool = False,
    ) -> str:
        """Create one requested job on the study's current generation; return its uid.

        Raises
        ------
        KeyError
            If the study is not in the ledger.
        """
        uid = str(uuid.uuid4())
        with self.transaction() as db:
            study = db.execute(
                "SELECT generation, state FROM studies WHERE study_uid = %s FOR UPDATE",
                (study_uid,),
            ).fetchone()
            if study is None:
                raise KeyError(study_uid)
            if complete and study["state"] == StudyState.RECEIVING:
                db.execute(
                    "UPDATE studies SET state = 'complete', completed_at = %s WHERE study_uid = %s",
                    (now, study_uid),
                )
            db.execute(
                "INSERT INTO jobs (uid, study_uid, analysis, series_uid, generation, state, reason,"
                " created_at, finished_at, origin, options)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    uid, study_uid, job.analysis, job.series_uid, study["generation"], job.state,
                    job.reason, now, None if job.state == JobState.QUEUED else now, origin,
                    json.dumps(options or {}, sort_keys=True),
                ),
            )
            if job.state == JobState.QUEUED:
                self._defer(db, uid, job.analysis)
        return uid

    def study_rows(self, limit: int = 100) -> list[StudyRecord]:
        """Return the most recent studies with their instance counts, for status views."""
        rows = self._fetch(
            f"{STUDY_SELECT} ORDER BY last_received_at DESC LIMIT %s", (limit,)
        )
        return [study_record(row) for row in rows]

    def study(self, study_uid: str) -> StudyRecord | None:
        """Return one study, or ``None``."""
        row = self._fetch_one(
            f"{STUDY_SELECT} WHERE study_uid = %s", (study_uid,)
        )
        return study_record(row) if row is not None else None

    def studies_to_purge(self, before: float) -> list[str]:
        """Return studies whose instances may leave the spool: idle since ``before``."""
        rows = self._fetch(
            "SELECT study_uid FROM studies s WHERE state = 'complete'"
            " AND last_received_at <= %(before)s AND coalesce(completed_at, 0) <= %(before)s"
            " AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid"
            "   AND (j.state IN ('queued', 'running') OR coalesce(j.finished_at, 0) > %(before)s))"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON d.job_id = j.id"
            "   WHERE j.study_uid = s.study_uid AND d.state = 'pending')"
            " ORDER BY last_received_at",
            {"before": before},
        )
        return [row["study_uid"] for row in rows]

    def forget_instances(self, study_uid: str, now: float) -> int:
        """Drop a purged study's instances and series; keep the study, jobs and deliveries."""
        with self.transaction() as db:
            dropped = db.execute("DELETE FROM instances WHERE study_uid = %s", (study_uid,)).rowcount
            db.execute("DELETE FROM series WHERE study_uid = %s", (study_uid,))
            db.execute("UPDATE studies SET purged_at = %s WHERE study_uid = %s", (now, study_uid))
            return int(dropped)

    # -- jobs ------------------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Put jobs that were running when the node stopped back in the queue.

        With a job queue nothing is done here: other hosts' workers may be running those
        jobs; the jobs of workers that stopped are found by :meth:`recover_stalled`.
        """
        if self.queues is not None:
            return 0
        with self.transaction() as db:
            return int(db.execute(
                "UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'"
            ).rowcount)

    def claim_next_job(self, now: float, analyses: Sequence[str]) -> JobRecord | None:
        """Move the oldest queued job of one of ``analyses`` to running and return it.

        ``FOR UPDATE SKIP LOCKED``: concurrent claimers each get a different job.
        """
        if not analyses:
            return None
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE state = 'queued' AND analysis = ANY(%s)"
                " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                (list(analyses),),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started_at = %s, attempts = attempts + 1"
                " WHERE id = %s",
                (now, row["id"]),
            )
            return job_record(row, attempts=row["attempts"] + 1, state=JobState.RUNNING,
                              started_at=now)

    def finish_job(
        self, job_id: int, now: float, *, state: JobState, reason: str | None = None,
        timings: dict[str, float] | None = None, result_dir: str | None = None,
        summary: dict[str, Any] | None = None, deliveries: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> JobState:
        """Record a job's outcome and queue its deliveries in one transaction.

        A job whose study has meanwhile moved on to a newer generation ends as
        ``superseded`` and queues nothing. Returns the state recorded.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT j.generation, j.cancel_requested, st.generation AS current FROM jobs j"
                " JOIN studies st ON st.study_uid = j.study_uid WHERE j.id = %s FOR UPDATE OF j",
                (job_id,),
            ).fetchone()
            if row is not None:
                state, reason, deliveries = job_outcome(row, state, reason, deliveries)
            db.execute(
                "UPDATE jobs SET state = %s, reason = %s, finished_at = %s, timings = %s,"
                " result_dir = coalesce(%s, result_dir), summary = %s WHERE id = %s",
                (
                    state, reason, now, json.dumps(timings or {}), result_dir,
                    json.dumps(summary or {}), job_id,
                ),
            )
            for destination, files in deliveries:
                db.execute(
                    "INSERT INTO deliveries (job_id, destination, files, state, attempts,"
                    " next_attempt_at) VALUES (%s, %s, %s, 'pending', 0, %s)"
                    " ON CONFLICT (job_id, destination) DO UPDATE SET files = EXCLUDED.files,"
                    " state = 'pending', attempts = 0, next_attempt_at = EXCLUDED.next_attempt_at,"
                    " last_error = NULL",
                    (job_id, destination, json.dumps(list(files)), now),
                )
        return state

    def add_timing(self, job_uid: str, stage: str, seconds: float) -> None:
        """Add one stage's duration to a job's timings (e.g. ``send``, measured after the job)."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT timings FROM jobs WHERE uid = %s FOR UPDATE", (job_uid,)
            ).fetchone()
            if row is not None:
                timings = json.loads(row["timings"])
                timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
                db.execute("UPDATE jobs SET timings = %s WHERE uid = %s",
                           (json.dumps(timings), job_uid))

    def retry_job(self, job_uid: str) -> bool:
        """Queue a failed, cancelled or finished job again; return whether it was found."""
        with self.transaction() as db:
            row = db.execute(
                "UPDATE jobs SET state = 'queued', reason = NULL, started_at = NULL,"
                " finished_at = NULL, attempts = 0, cancel_requested = 0 WHERE uid = %s AND state IN"
                " ('failed', 'cancelled', 'done', 'not_applicable') RETURNING analysis",
                (job_uid,),
            ).fetchone()
            if row is not None:
                self._defer(db, job_uid, row["analysis"])
            return row is not None

    def cancel_job(self, job_uid: str, now: float) -> JobState | None:
        """Cancel a job: a queued one at once, a running one when it ends (results discarded)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s, reason = 'cancelled'"
                " WHERE uid = %s AND state = 'queued'",
                (now, job_uid),
            )
            db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE uid = %s AND state = 'running'",
                (job_uid,),
            )
            if self.queues is not None:
                db.execute(
                    "UPDATE procrastinate_jobs SET status = 'cancelled' WHERE queueing_lock = %s"
                    " AND status = 'todo' AND task_name = %s",
                    (job_uid, queue.TASK_NAME),
                )
            row = db.execute("SELECT state FROM jobs WHERE uid = %s", (job_uid,)).fetchone()
        return None if row is None else JobState(row["state"])

    def job_rows(
        self, *, state: str | None = None, limit: int = 100, analysis: str | None = None,
        study_uid: str | None = None, origin: str | None = None,
    ) -> list[JobRecord]:
        """Return recent jobs, newest first, with deliveries; optionally filtered by column."""
        filters = {"state": state, "analysis": analysis, "study_uid": study_uid, "origin": origin}
        chosen = {k: v for k, v in filters.items() if v is not None}
        where = " AND ".join(f"{k} = %s" for k in chosen) or "TRUE"
        return self._jobs_where(where, tuple(chosen.values()), limit=limit)

    def _jobs_where(self, where: str, params: tuple[Any, ...], *, limit: int) -> list[JobRecord]:
        with self._connection() as db:
            return self._jobs_in(db, where, params, limit=limit)

    def _jobs_in(self, db: Connection, where: str, params: tuple[Any, ...], *, limit: int) -> list[JobRecord]:
        rows = db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY id DESC LIMIT %s", (*params, limit)
        ).fetchall()
        jobs = []
        for row in rows:
            deliveries = tuple(
                DeliveryRecord(d["destination"], DeliveryState(d["state"]), d["attempts"],
                               d["last_error"], d["sent_at"], d["next_attempt_at"])
                for d in db.execute(
                    "SELECT destination, state, attempts, last_error, sent_at, next_attempt_at"
                    " FROM deliveries WHERE job_id = %s ORDER BY id",
                    (row["id"],),
                ).fetchall()
            )
            jobs.append(job_record(row, deliveries=deliveries))
        return jobs

    def job(self, job_uid: str) -> JobRecord | None:
        """Return one job by uid, or ``None``."""
        jobs = self._jobs_where("uid = %s", (job_uid,), limit=1)
        return jobs[0] if jobs else None

    # -- the job queue (scaled-out mode) ----------------------------------------------

    def _defer(self, db: Connection, job_uid: str, analysis: str) -> None:
        if self.queues is not None:
            queue.defer(db, job_uid, queue.queue_of(self.queues, analysis))

    def start_job(self, job_uid: str, now: float) -> JobRecord | None:
        """Move a job a worker took from the queue to running; ``None`` when it must not run.

        A job still queued, or running because its earlier worker stopped (the queue gave it
        to this worker after :meth:`recover_stalled`), starts; a cancelled, superseded or
        finished one does not.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM jobs WHERE uid = %s AND state IN ('queued', 'running') FOR UPDATE",
                (job_uid,),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started_at = %s, attempts = attempts + 1"
                " WHERE id = %s",
                (now, row["id"]),
            )
            return job_record(row, attempts=row["attempts"] + 1, state=JobState.RUNNING,
                              started_at=now)

    def recover_stalled(self, stalled_after_s: float) -> list[str]:
        """Queue again the jobs of workers silent for ``stalled_after_s``; return their uids.

        The queue entries and the ledger rows change in one transaction; rows locked by
        another process doing the same are skipped, so each job is recovered once.
        """
        with self.transaction() as db:
            uids = queue.requeue_stalled(db, stalled_after_s)
            if uids:
                db.execute(
                    "UPDATE jobs SET state = 'queued', started_at = NULL"
                    " WHERE uid = ANY(%s) AND state = 'running'",
                    (uids,),
                )
        return uids

    def queue_depths(self, stalled_after_s: float) -> dict[str, dict[str, int]]:
        """Return, per queue, jobs waiting, running, stalled, retrying and dead (:func:`queue.queue_depths`)."""
        with self._connection() as db:
            return queue.queue_depths(db, stalled_after_s)

    def workers(self, stalled_after_s: float) -> list[dict[str, Any]]:
        """Return the registered queue workers: who, heartbeat, current job (:func:`queue.workers`)."""
        with self._connection() as db:
            return queue.workers(db, stalled_after_s)

    def register_worker(self, worker_id: int, *, host: str, device: str, analyses: Sequence[str],
                        pid: int, now: float) -> None:
        """Record the identity of procrastinate's worker ``worker_id`` (:func:`queue.register_worker`)."""
        with self.transaction() as db:
            queue.register_worker(db, worker_id, host=host, device=device, analyses=analyses,
                                  pid=pid, now=now)

    def forget_workers(self, silent_for_s: float) -> list[int]:
        """Remove the workers silent for ``silent_for_s``, with their identities; return their ids."""
        with self.transaction() as db:
            return queue.forget_workers(db, silent_for_s)

    # -- deliveries ------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DueDelivery]:
        """Return pending deliveries whose next attempt is due, oldest first."""
        rows = self._fetch(
            "SELECT d.*, j.uid AS job_uid, j.study_uid FROM deliveries d"
            " JOIN jobs j ON j.id = d.job_id WHERE d.state = 'pending'"
            " AND d.next_attempt_at <= %s ORDER BY d.next_attempt_at",
            (now,),
        )
        return [
            DueDelivery(row["id"], row["job_uid"], row["study_uid"], row["destination"],
                        tuple(json.loads(row["files"])), row["attempts"])
            for row in rows
        ]

    def claim_delivery(self, delivery_id: int, now: float, lease_s: float) -> bool:
        """Take a due delivery for ``lease_s`` so no other receiver sends it too; return whether taken.

        One conditional UPDATE: of two receivers that both saw it due, one takes it. A
        sender that dies mid-send leaves it due again once the lease is over.
        """
        with self.transaction() as db:
            return db.execute(
                "UPDATE deliveries SET next_attempt_at = %s WHERE id = %s AND state = 'pending'"
                " AND next_attempt_at <= %s",
                (now + lease_s, delivery_id, now),
            ).rowcount > 0

    def delivery_succeeded(self, delivery_id: int, now: float) -> None:
        """Mark a delivery sent."""
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'sent', sent_at = %s, attempts = attempts + 1,"
                " last_error = NULL WHERE id = %s",
                (now, delivery_id),
            )

    def delivery_failed(
        self, delivery_id: int, now: float, error: str, *, retry_at: float | None
    ) -> None:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter when ``None``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = %(error)s,"
                " state = CASE WHEN %(retry)s::double precision IS NULL THEN 'dead' ELSE 'pending' END,"
                " next_attempt_at = coalesce(%(retry)s::double precision, next_attempt_at)"
                " WHERE id = %(id)s",
                {"error": error, "retry": retry_at, "id": delivery_id},
            )

    def redeliver(self, now: float, job_uid: str | None = None) -> int:
        """Move dead-lettered deliveries (of one job, or all) back to pending; return how many."""
        query = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %s"
            " WHERE state = 'dead'"
        )
        params: tuple[Any, ...] = (now,)
        if job_uid is not None:
            query += " AND job_id = (SELECT id FROM jobs WHERE uid = %s)"
            params = (now, job_uid)
        with self.transaction() as db:
            return int(db.execute(query, params).rowcount)

    # -- sources ---------------------------------------------------------------------

    def source_cursor(self, source: str) -> int | None:
        """Return the index of the last change of ``source`` handled, or ``None`` before the first."""
        row = self._fetch_one("SELECT last_change FROM source_cursors WHERE source = %s", (source,))
        return None if row is None else int(row["last_change"])

    def set_source_cursor(self, source: str, last_change: int, now: float) -> None:
        """Record that every change of ``source`` up to ``last_change`` was handled."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO source_cursors (source, last_change, updated_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (source) DO UPDATE SET last_change = EXCLUDED.last_change,"
                " updated_at = EXCLUDED.updated_at",
                (source, last_change, now),
            )

    def counts(self) -> LedgerCounts:
        """Return counts of jobs, deliveries and studies by state, and of instances."""
        def by_state(table: str) -> dict[str, int]:
            rows = self._fetch(f"SELECT state, count(*) AS n FROM {table} GROUP BY state")
            return {row["state"]: int(row["n"]) for row in rows}

        row = self._fetch_one("SELECT count(*) AS n FROM instances")
        low = self._fetch_one("SELECT count(*) AS n FROM jobs"
                              " WHERE summary::jsonb #>> '{quality,low_confidence}' = 'true'")
        return LedgerCounts(studies=by_state("studies"), jobs=by_state("jobs"),
                            deliveries=by_state("deliveries"),
                            instances=int(row["n"]) if row is not None else 0,
                            low_confidence=int(low["n"]) if low is not None else 0)
