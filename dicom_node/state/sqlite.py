"""The ledger in SQLite (WAL): the single-box backend, every change one transaction."""

from __future__ import annotations

import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicom_node.errors import ConfigError
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
from dicom_node.state.schema import SCHEMA, SCHEMA_VERSION, migrate


def stored_version(path: Path) -> int | None:
    """Return the schema version recorded in the ledger file at ``path``, or ``None`` if there is none."""
    if not path.exists():
        return None
    db = sqlite3.connect(path)
    try:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
            return 1 if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone() else None
        found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if found is None else int(found[0])
    finally:
        db.close()


class SqliteLedger:
    """The node's durable state in one SQLite database (WAL mode).

    Each thread gets its own connection; every method is one transaction. ``synchronous``
    is ``NORMAL``: a commit survives a crash of the node, and after a power cut the last
    commits may be missing. That loses nothing: instance files are fsynced before they are
    recorded and the node re-records spool files the ledger lacks at start-up
    (:func:`dicom_node.receive.recovery.recover_spool`); a job whose outcome was lost runs again
    and files the same deterministic UIDs. ``FULL`` adds an fsync to every commit.
    """

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        if synchronous not in {"FULL", "NORMAL"}:
            raise ValueError("synchronous must be 'FULL' or 'NORMAL'")
        self.path = path
        self._synchronous = synchronous
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connection()
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found is not None and int(found[0]) > SCHEMA_VERSION:
            raise ConfigError(
                f"{path}: the ledger has schema version {found[0]}, written by a newer dicom-node"
                f" (this one knows up to {SCHEMA_VERSION}): run the newer version, or restore a backup"
            )
        if db.execute("SELECT 1 FROM sqlite_master WHERE name IN ('jobs', 'series')").fetchone():
            migrate(db)
        db.executescript(SCHEMA)
        with self.transaction() as tx:
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run a block as one ``BEGIN IMMEDIATE`` transaction."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        """Close this thread's connection."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- instances -------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, series: dict[str, Any]) -> bool:
        """Record a stored instance and update its study; return whether it was new.

        A new instance of a study that was already complete opens a new generation of
        that study: its analyses run again and supersede the earlier results. An instance
        received again (same SOP Instance UID) changes nothing but its file.
        """
        with self.transaction() as db:
            known = db.execute(
                "SELECT 1 FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,)
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO instances (sop_instance_uid, series_uid, study_uid,"
                " sop_class_uid, transfer_syntax_uid, path, size_bytes, calling_ae_title,"
                " received_at, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.sop_instance_uid, record.series_uid, record.study_uid,
                    record.sop_class_uid, record.transfer_syntax_uid, record.path,
                    record.size_bytes, record.calling_ae_title, record.received_at, record.sha256,
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO series (series_uid, study_uid, modality, description,"
                " sop_class_uid, manufacturer, rows, columns, orientation, pixel_spacing,"
                " slice_thickness, number_of_frames, convolution_kernel) VALUES (:series_uid,"
                " :study_uid, :modality, :description, :sop_class_uid, :manufacturer, :rows,"
                " :columns, :orientation, :pixel_spacing, :slice_thickness, :number_of_frames,"
                " :convolution_kernel)",
                {"series_uid": record.series_uid, "study_uid": record.study_uid,
                 "convolution_kernel": "", **series},
            )
            if known:
                return False
            study = db.execute(
                "SELECT state FROM studies WHERE study_uid = ?", (record.study_uid,)
            ).fetchone()
            now = record.received_at
            if study is None:
                db.execute(
                    "INSERT INTO studies (study_uid, state, generation, first_received_at,"
                    " last_received_at, origin) VALUES (?, 'receiving', 1, ?, ?, ?)",
                    (record.study_uid, now, now, record.origin),
                )
            elif study["state"] == StudyState.COMPLETE and self._announced(db, record.study_uid):
                # part of what the source announced when the study was completed from its
                # inventory (a series no analysis needed, still arriving): not a new generation
                pass
            elif study["state"] == StudyState.COMPLETE:
                db.execute(
                    "UPDATE studies SET state = 'receiving', generation = generation + 1,"
                    " first_received_at = ?, last_received_at = ?, completed_at = NULL,"
                    " purged_at = NULL, expected_instances = NULL WHERE study_uid = ?",
                    (now, now, record.study_uid),
                )
            else:
                db.execute(
                    "UPDATE studies SET last_received_at = max(last_received_at, ?)"
                    " WHERE study_uid = ?",
                    (now, record.study_uid),
                )
            return True

    @staticmethod
    def _announced(db: sqlite3.Connection, study_uid: str) -> bool:
        row = db.execute(
            "SELECT expected_instances, (SELECT count(*) FROM instances i WHERE i.study_uid ="
            " st.study_uid) AS held FROM studies st WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        return row is not None and row[0] is not None and row[1] <= row[0]

    def recorded_paths(self) -> set[str]:
        """Return the spool paths of every recorded instance."""
        return {row[0] for row in self._connection().execute("SELECT path FROM instances")}

    def series_of_study(self, study_uid: str) -> list[SeriesInfo]:
        """Return the series of a study with their instance counts."""
        rows = self._connection().execute(
            "SELECT s.*, (SELECT count(*) FROM instances i WHERE i.series_uid = s.series_uid)"
            " AS instance_count FROM series s WHERE s.study_uid = ? ORDER BY s.rowid",
            (study_uid,),
        ).fetchall()
        return [series_info(row) for row in rows]

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Return the spool paths of a series' instances."""
        rows = self._connection().execute(
            "SELECT path FROM instances WHERE series_uid = ? ORDER BY sop_instance_uid",
            (series_uid,),
        ).fetchall()
        return [Path(row["path"]) for row in rows]

    def manifest(self, series_uid: str) -> list[ManifestEntry]:
        """Return a series' instances with their sizes and SHA-256, ordered by SOP Instance UID."""
        rows = self._connection().execute(
            "SELECT sop_instance_uid, path, size_bytes, sha256 FROM instances WHERE series_uid = ?"
            " ORDER BY sop_instance_uid",
            (series_uid,),
        ).fetchall()
        return [ManifestEntry(r["sop_instance_uid"], r["path"], r["size_bytes"], r["sha256"]) for r in rows]

    # -- studies ---------------------------------------------------------------------

    def studies_due(self, now: float, quiet_period_s: float, max_wait_s: float) -> list[str]:
        """Return studies still receiving whose quiet period or maximum wait has passed."""
        rows = self._connection().execute(
            "SELECT study_uid FROM studies WHERE state = 'receiving'"
            " AND (last_received_at <= ? OR first_received_at <= ?) ORDER BY first_received_at",
            (now - quiet_period_s, now - max_wait_s),
        ).fetchall()
        return [row["study_uid"] for row in rows]

    def receiving_studies(self) -> dict[str, frozenset[str]]:
        """Return the studies still receiving, each with the calling AE titles that sent it."""
        rows = self._connection().execute(
            "SELECT DISTINCT st.study_uid, i.calling_ae_title FROM studies st JOIN instances i"
            " ON i.study_uid = st.study_uid WHERE st.state = 'receiving'"
        ).fetchall()
        callers: dict[str, set[str]] = {}
        for row in rows:
            callers.setdefault(row[0], set()).add(row[1])
        return {study: frozenset(titles) for study, titles in callers.items()}

    def complete_study(
        self,
        study_uid: str,
        now: float,
        planned: Sequence[PlannedJob],
        *,
        instances_seen: int | None = None,
        expected_instances: int | None = None,
        keep_receiving: bool = False,
    ) -> list[str]:
        """Mark a study complete and create its jobs in one transaction.

        Jobs of earlier generations that have not run yet, and undelivered results of
        earlier generations, are superseded. ``instances_seen`` is the number of instances
        the plan was made on: when the study holds more by now, nothing changes.
        ``expected_instances`` is how many instances the study's source announced: until the
        study holds more, arriving instances belong to this generation. With
        ``keep_receiving`` the jobs are created but the study stays receiving: the series
        they need arrived while other needed series are still arriving. Returns the new
        jobs' uids (empty when the study had meanwhile received more instances or was
        already complete; a planned job that exists already is not created again).
        """
        created = []
        with self.transaction() as db:
            study = db.execute(
                "SELECT generation, state, origin FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if study is None or study["state"] != StudyState.RECEIVING:
                return []
            if instances_seen is not None:
                count = db.execute(
                    "SELECT count(*) FROM instances WHERE study_uid = ?", (study_uid,)
                ).fetchone()[0]
                if count != instances_seen:
                    return []
            generation = study["generation"]
            if not keep_receiving:
                db.execute(
                    "UPDATE studies SET state = 'complete', completed_at = ?, expected_instances = ?"
                    " WHERE study_uid = ?",
                    (now, expected_instances, study_uid),
                )
            db.execute(
                "UPDATE jobs SET state = 'superseded', finished_at = ?,"
                " reason = 'new instances arrived; a newer analysis replaces this one'"
                " WHERE study_uid = ? AND generation < ? AND state = 'queued'",
                (now, study_uid, generation),
            )
            db.execute(
                "UPDATE deliveries SET state = 'superseded' WHERE state = 'pending' AND job_id IN"
                " (SELECT id FROM jobs WHERE study_uid = ? AND generation < ?)",
                (study_uid, generation),
            )
            for job in planned:
                uid = str(uuid.uuid4())
                inserted = db.execute(
                    "INSERT OR IGNORE INTO jobs (uid, study_uid, analysis, series_uid, generation,"
                    " state, reason, created_at, finished_at, origin)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        uid, study_uid, job.analysis, job.series_uid, generation, job.state,
                        job.reason, now, None if job.state == JobState.QUEUED else now,
                        Origin.WATCH if study["origin"] == Origin.WATCH else Origin.DICOM,
                    ),
                )
                if inserted.rowcount:
                    created.append(uid)
        return created

    def create_job(
        self, study_uid: str, job: PlannedJob, now: float, *, origin: Origin,
        options: dict[str, Any] | None = None, complete: bool = False,
    ) -> str:
        """Create one requested job on the study's current generation; return its uid.

        With ``complete`` a study still receiving is marked complete without its configured
        analyses: the request names what runs (an HTTP job on a folder it just ingested).

        Raises
        ------
        KeyError
            If the study is not in the ledger.
        """
        uid = str(uuid.uuid4())
        with self.transaction() as db:
            study = db.execute(
                "SELECT generation, state FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            if study is None:
                raise KeyError(study_uid)
            if complete and study["state"] == StudyState.RECEIVING:
                db.execute(
                    "UPDATE studies SET state = 'complete', completed_at = ? WHERE study_uid = ?",
                    (now, study_uid),
                )
            db.execute(
                "INSERT INTO jobs (uid, study_uid, analysis, series_uid, generation, state, reason,"
                " created_at, finished_at, origin, options) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uid, study_uid, job.analysis, job.series_uid, study["generation"], job.state,
                    job.reason, now, None if job.state == JobState.QUEUED else now, origin,
                    json.dumps(options or {}, sort_keys=True),
                ),
            )
        return uid

    def study_rows(self, limit: int = 100) -> list[StudyRecord]:
        """Return the most recent studies with their instance counts, for status views."""
        rows = self._connection().execute(
            f"{STUDY_SELECT} ORDER BY last_received_at DESC LIMIT ?", (limit,)
        ).fetchall()
        return [study_record(row) for row in rows]

    def study(self, study_uid: str) -> StudyRecord | None:
        """Return one study, or ``None``."""
        row = self._connection().execute(
            f"{STUDY_SELECT} WHERE study_uid = ?", (study_uid,)
        ).fetchone()
        return study_record(row) if row is not None else None

    def studies_to_purge(self, before: float) -> list[str]:
        """Return studies whose instances may leave the spool: idle since ``before``.

        A study qualifies when it is complete, received nothing and finished no job since
        ``before``, has no job queued or running and no delivery pending, and still has
        instances. Failed jobs and dead deliveries do not hold a study back.
        """
        rows = self._connection().execute(
            "SELECT study_uid FROM studies s WHERE state = 'complete'"
            " AND last_received_at <= :before AND coalesce(completed_at, 0) <= :before"
            " AND EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid"
            "   AND (j.state IN ('queued', 'running') OR coalesce(j.finished_at, 0) > :before))"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON d.job_id = j.id"
            "   WHERE j.study_uid = s.study_uid AND d.state = 'pending')"
            " ORDER BY last_received_at",
            {"before": before},
        ).fetchall()
        return [row["study_uid"] for row in rows]

    def forget_instances(self, study_uid: str, now: float) -> int:
        """Drop a purged study's instances and series; keep the study, jobs and deliveries.

        The study stays complete, with ``purged_at`` set, so that an instance arriving
        later opens a new generation like any late instance. Returns how many instances
        were dropped.
        """
        with self.transaction() as db:
            dropped = db.execute("DELETE FROM instances WHERE study_uid = ?", (study_uid,)).rowcount
            db.execute("DELETE FROM series WHERE study_uid = ?", (study_uid,))
            db.execute("UPDATE studies SET purged_at = ? WHERE study_uid = ?", (now, study_uid))
            return int(dropped)

    # -- jobs ------------------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Put jobs that were running when the node stopped back in the queue."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'"
            ).rowcount

    def claim_next_job(self, now: float, analyses: Sequence[str]) -> JobRecord | None:
        """Move the oldest queued job of one of ``analyses`` to running and return it."""
        if not analyses:
            return None
        marks = ",".join("?" * len(analyses))
        with self.transaction() as db:
            row = db.execute(
                f"SELECT * FROM jobs WHERE state = 'queued' AND analysis IN ({marks})"
                " ORDER BY id LIMIT 1",
                tuple(analyses),
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1"
                " WHERE id = ?",
                (now, row["id"]),
            )
            return job_record(row, attempts=row["attempts"] + 1, state=JobState.RUNNING,
                               started_at=now)

    def finish_job(
        self,
        job_id: int,
        now: float,
        *,
        state: JobState,
        reason: str | None = None,
        timings: dict[str, float] | None = None,
        result_dir: str | None = None,
        summary: dict[str, Any] | None = None,
        deliveries: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> JobState:
        """Record a job's outcome and queue its deliveries in one transaction.

        A job whose study has meanwhile moved on to a newer generation ends as
        ``superseded`` and queues nothing. Returns the state recorded.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT j.generation, j.cancel_requested, st.generation AS current FROM jobs j"
                " JOIN studies st ON st.study_uid = j.study_uid WHERE j.id = ?",
                (job_id,),
            ).fetchone()
            if row is not None:
                state, reason, deliveries = job_outcome(row, state, reason, deliveries)
            db.execute(
                "UPDATE jobs SET state = ?, reason = ?, finished_at = ?, timings = ?,"
                " result_dir = coalesce(?, result_dir), summary = ? WHERE id = ?",
                (
                    state, reason, now, json.dumps(timings or {}), result_dir,
                    json.dumps(summary or {}), job_id,
                ),
            )
            for destination, files in deliveries:
                db.execute(
                    "INSERT INTO deliveries (job_id, destination, files, state, attempts,"
                    " next_attempt_at) VALUES (?, ?, ?, 'pending', 0, ?)"
                    " ON CONFLICT (job_id, destination) DO UPDATE SET files = excluded.files,"
                    " state = 'pending', attempts = 0, next_attempt_at = excluded.next_attempt_at,"
                    " last_error = NULL",
                    (job_id, destination, json.dumps(list(files)), now),
                )
        return state

    def add_timing(self, job_uid: str, stage: str, seconds: float) -> None:
        """Add one stage's duration to a job's timings (e.g. ``send``, measured after the job)."""
        with self.transaction() as db:
            row = db.execute("SELECT timings FROM jobs WHERE uid = ?", (job_uid,)).fetchone()
            if row is not None:
                timings = json.loads(row["timings"])
                timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
                db.execute("UPDATE jobs SET timings = ? WHERE uid = ?", (json.dumps(timings), job_uid))

    def retry_job(self, job_uid: str) -> bool:
        """Queue a failed, cancelled or finished job again; return whether it was found."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE jobs SET state = 'queued', reason = NULL, started_at = NULL,"
                " finished_at = NULL, attempts = 0, cancel_requested = 0 WHERE uid = ? AND state IN"
                " ('failed', 'cancelled', 'done', 'not_applicable')",
                (job_uid,),
            ).rowcount > 0

    def cancel_job(self, job_uid: str, now: float) -> JobState | None:
        """Cancel a job: a queued one at once, a running one when it ends (results discarded).

        Returns the job's state afterwards (``cancelled``, ``running`` or a final state it
        already had), or ``None`` when there is no such job.
        """
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, reason = 'cancelled'"
                " WHERE uid = ? AND state = 'queued'",
                (now, job_uid),
            )
            db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE uid = ? AND state = 'running'", (job_uid,)
            )
            row = db.execute("SELECT state FROM jobs WHERE uid = ?", (job_uid,)).fetchone()
        return None if row is None else JobState(row["state"])

    def job_rows(
        self, *, state: str | None = None, limit: int = 100, analysis: str | None = None,
        study_uid: str | None = None, origin: str | None = None,
    ) -> list[JobRecord]:
        """Return recent jobs, newest first, with deliveries; optionally filtered by column."""
        filters = {"state": state, "analysis": analysis, "study_uid": study_uid, "origin": origin}
        chosen = {k: v for k, v in filters.items() if v is not None}
        where = " AND ".join(f"{k} = ?" for k in chosen) or "1"
        return self._jobs_where(where, tuple(chosen.values()), limit=limit)

    def _jobs_where(self, where: str, params: tuple[Any, ...], *, limit: int) -> list[JobRecord]:
        db = self._connection()
        rows = db.execute(
            f"SELECT * FROM jobs WHERE {where} ORDER BY id DESC LIMIT ?", (*params, limit)
        ).fetchall()
        jobs = []
        for row in rows:
            deliveries = tuple(
                DeliveryRecord(d["destination"], DeliveryState(d["state"]), d["attempts"],
                               d["last_error"], d["sent_at"], d["next_attempt_at"])
                for d in db.execute(
                    "SELECT destination, state, attempts, last_error, sent_at, next_attempt_at"
                    " FROM deliveries WHERE job_id = ? ORDER BY id",
                    (row["id"],),
                )
            )
            jobs.append(job_record(row, deliveries=deliveries))
        return jobs

    def job(self, job_uid: str) -> JobRecord | None:
        """Return one job by uid, or ``None``."""
        jobs = self._jobs_where("uid = ?", (job_uid,), limit=1)
        return jobs[0] if jobs else None

    # -- deliveries ------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DueDelivery]:
        """Return pending deliveries whose next attempt is due, oldest first."""
        rows = self._connection().execute(
            "SELECT d.*, j.uid AS job_uid, j.study_uid FROM deliveries d"
            " JOIN jobs j ON j.id = d.job_id WHERE d.state = 'pending'"
            " AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at",
            (now,),
        ).fetchall()
        return [
            DueDelivery(row["id"], row["job_uid"], row["study_uid"], row["destination"],
                        tuple(json.loads(row["files"])), row["attempts"])
            for row in rows
        ]

    def claim_delivery(self, delivery_id: int, now: float, lease_s: float) -> bool:
        """Take a due delivery for ``lease_s`` so no other sender attempts it; return whether taken.

        Moving its next attempt past the lease is the claim: a sender that dies mid-send
        leaves it due again once the lease is over.
        """
        with self.transaction() as db:
            return db.execute(
                "UPDATE deliveries SET next_attempt_at = ? WHERE id = ? AND state = 'pending'"
                " AND next_attempt_at <= ?",
                (now + lease_s, delivery_id, now),
            ).rowcount > 0

    def delivery_succeeded(self, delivery_id: int, now: float) -> None:
        """Mark a delivery sent."""
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'sent', sent_at = ?, attempts = attempts + 1,"
                " last_error = NULL WHERE id = ?",
                (now, delivery_id),
            )

    def delivery_failed(
        self, delivery_id: int, now: float, error: str, *, retry_at: float | None
    ) -> None:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter when ``None``."""
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, last_error = ?,"
                " state = CASE WHEN ? IS NULL THEN 'dead' ELSE 'pending' END,"
                " next_attempt_at = coalesce(?, next_attempt_at) WHERE id = ?",
                (error, retry_at, retry_at, delivery_id),
            )

    def redeliver(self, now: float, job_uid: str | None = None) -> int:
        """Move dead-lettered deliveries (of one job, or all) back to pending; return how many."""
        query = (
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?"
            " WHERE state = 'dead'"
        )
        params: tuple[Any, ...] = (now,)
        if job_uid is not None:
            query += " AND job_id = (SELECT id FROM jobs WHERE uid = ?)"
            params = (now, job_uid)
        with self.transaction() as db:
            return db.execute(query, params).rowcount

    # -- sources ---------------------------------------------------------------------

    def source_cursor(self, source: str) -> int | None:
        """Return the index of the last change of ``source`` handled, or ``None`` before the first."""
        row = self._connection().execute(
            "SELECT last_change FROM source_cursors WHERE source = ?", (source,)
        ).fetchone()
        return None if row is None else int(row[0])

    def set_source_cursor(self, source: str, last_change: int, now: float) -> None:
        """Record that every change of ``source`` up to ``last_change`` was handled."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO source_cursors (source, last_change, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (source) DO UPDATE SET last_change = excluded.last_change,"
                " updated_at = excluded.updated_at",
                (source, last_change, now),
            )

    def counts(self) -> LedgerCounts:
        """Return counts of jobs, deliveries and studies by state, and of instances."""
        db = self._connection()

        def by_state(table: str) -> dict[str, int]:
            return {r[0]: r[1] for r in db.execute(f"SELECT state, count(*) FROM {table} GROUP BY state")}

        instances = db.execute("SELECT count(*) FROM instances").fetchone()[0]
        # The flag lives in the job's JSON summary, written by the pipeline (result_summary).
        low = db.execute("SELECT count(*) FROM jobs WHERE"
                         " json_extract(summary, '$.quality.low_confidence') = 1").fetchone()[0]
        return LedgerCounts(studies=by_state("studies"), jobs=by_state("jobs"),
                            deliveries=by_state("deliveries"), instances=int(instances),
                            low_confidence=int(low))
