"""The ledger interface: every durable state change the node makes, whatever database holds it.

The node, the API and the commands talk to a :class:`Ledger`; SQL lives only in the
backends beside this module (:mod:`dicom_node.state.sqlite` on one box,
:mod:`dicom_node.state.postgres` when scaled out). Every method is
one transaction. Times are seconds since the epoch from the caller's clock.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from dicom_node.config import StateSettings
from dicom_node.errors import ConfigError

from dicom_node.state.records import (
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
)
from dicom_node.state.schema import SCHEMA_VERSION

#: The ledger file in a node's data directory (single-box backend).
LEDGER_FILE = "ledger.sqlite3"


class Ledger(Protocol):
    """The node's durable state: instances, series, studies, jobs and deliveries."""

    # -- instances -------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, series: dict[str, Any]) -> bool:
        """Record a stored instance and update its study; return whether it was new.

        A new instance of a complete study opens a new generation of that study.
        """

    def recorded_paths(self) -> set[str]:
        """Return the spool paths of every recorded instance."""

    def series_of_study(self, study_uid: str) -> list[SeriesInfo]:
        """Return the series of a study with their instance counts."""

    def instance_paths(self, series_uid: str) -> list[Path]:
        """Return the spool paths of a series' instances."""

    def manifest(self, series_uid: str) -> list[ManifestEntry]:
        """Return a series' instances with their sizes and SHA-256, ordered by SOP Instance UID."""

    # -- studies ---------------------------------------------------------------------

    def studies_due(self, now: float, quiet_period_s: float, max_wait_s: float) -> list[str]:
        """Return studies still receiving whose quiet period or maximum wait has passed."""

    def receiving_studies(self) -> dict[str, frozenset[str]]:
        """Return the studies still receiving, each with the calling AE titles that sent it."""

    def complete_study(
        self, study_uid: str, now: float, planned: Sequence[PlannedJob], *,
        instances_seen: int | None = None, expected_instances: int | None = None,
        keep_receiving: bool = False,
    ) -> list[str]:
        """Mark a study complete and create its jobs; return the new jobs' uids.

        ``expected_instances``: how many instances the study's source announced; until the
        study holds more, arriving instances do not open a new generation.
        ``keep_receiving``: create the jobs but leave the study receiving (the series these
        jobs need arrived; other needed series are still arriving). A planned job that
        exists already is not created again.
        """

    def create_job(
        self, study_uid: str, job: PlannedJob, now: float, *, origin: Origin,
        options: dict[str, Any] | None = None, complete: bool = False,
    ) -> str:
        """Create one requested job on the study's current generation; return its uid."""

    def study_rows(self, limit: int = 100) -> list[StudyRecord]:
        """Return the most recent studies with their instance counts."""

    def study(self, study_uid: str) -> StudyRecord | None:
        """Return one study, or ``None``."""

    def studies_to_purge(self, before: float) -> list[str]:
        """Return studies whose instances may leave the spool: idle since ``before``."""

    def forget_instances(self, study_uid: str, now: float) -> int:
        """Drop a purged study's instances and series, keep its history; return how many."""

    # -- jobs ------------------------------------------------------------------------

    def requeue_interrupted(self) -> int:
        """Put jobs that were running when the node stopped back in the queue."""

    def claim_next_job(self, now: float, analyses: Sequence[str]) -> JobRecord | None:
        """Move the oldest queued job of one of ``analyses`` to running and return it."""

    def finish_job(
        self, job_id: int, now: float, *, state: JobState, reason: str | None = None,
        timings: dict[str, float] | None = None, result_dir: str | None = None,
        summary: dict[str, Any] | None = None, deliveries: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> JobState:
        """Record a job's outcome and queue its deliveries; return the state recorded."""

    def add_timing(self, job_uid: str, stage: str, seconds: float) -> None:
        """Add one stage's duration to a job's timings."""

    def retry_job(self, job_uid: str) -> bool:
        """Queue a final job again; return whether one was re-queued."""

    def cancel_job(self, job_uid: str, now: float) -> JobState | None:
        """Cancel a job; return its state afterwards, or ``None`` when there is no such job."""

    def job_rows(
        self, *, state: str | None = None, limit: int = 100, analysis: str | None = None,
        study_uid: str | None = None, origin: str | None = None,
    ) -> list[JobRecord]:
        """Return recent jobs, newest first, with deliveries; optionally filtered."""

    def job(self, job_uid: str) -> JobRecord | None:
        """Return one job by uid, or ``None``."""

    # -- deliveries ------------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DueDelivery]:
        """Return pending deliveries whose next attempt is due, oldest first."""

    def claim_delivery(self, delivery_id: int, now: float, lease_s: float) -> bool:
        """Take a due delivery for ``lease_s`` so no other sender attempts it; return whether taken."""

    def delivery_succeeded(self, delivery_id: int, now: float) -> None:
        """Mark a delivery sent."""

    def delivery_failed(self, delivery_id: int, now: float, error: str, *, retry_at: float | None) -> None:
        """Record a failed attempt: retry at ``retry_at``, or dead-letter when ``None``."""

    def redeliver(self, now: float, job_uid: str | None = None) -> int:
        """Move dead-lettered deliveries (of one job, or all) back to pending; return how many."""

    # -- sources ---------------------------------------------------------------------

    def source_cursor(self, source: str) -> int | None:
        """Return the index of the last change of ``source`` handled, or ``None`` before the first."""

    def set_source_cursor(self, source: str, last_change: int, now: float) -> None:
        """Record that every change of ``source`` up to ``last_change`` was handled."""

    def counts(self) -> LedgerCounts:
        """Return counts of studies, jobs and deliveries by state, and of instances."""

    def close(self) -> None:
        """Release this thread's connection (SQLite) or every pooled connection (PostgreSQL)."""


def open_ledger(
    data_dir: Path, state: StateSettings | None = None, *, environ: Mapping[str, str] | None = None,
    queues: Mapping[str, str] | None = None,
) -> Ledger:
    """Open the ledger the configuration names: SQLite in ``data_dir``, or PostgreSQL.

    The SQLite ledger is created or migrated on opening, as it always was on one box; a
    PostgreSQL ledger must have been created with ``dicom-node db upgrade`` first.

    Parameters
    ----------
    data_dir
        The node's data directory (``node.data_dir``): where the SQLite ledger lives.
    state
        The ``[state]`` settings; ``None`` means the single-box default (SQLite).
    environ
        Where the database password may come from (default: the process environment).
    queues
        PostgreSQL only: the queue of each analysis, to defer every queued job to the job
        queue in the same transaction (:mod:`dicom_node.state.queue`).

    Raises
    ------
    ConfigError
        If the database cannot be reached, its schema is missing, older or newer than this
        node's (the message names the command to run), or the PostgreSQL client library
        is not installed.
    """
    if state is None or state.backend == "sqlite":
        from dicom_node.state.sqlite import SqliteLedger

        return SqliteLedger(data_dir / LEDGER_FILE)
    _require_psycopg()
    from dicom_node.state.postgres import PostgresLedger

    assert state.dsn is not None  # validated: the postgresql backend has a dsn
    password = state.password(os.environ if environ is None else environ)
    return PostgresLedger(state.dsn, password, connect_timeout_s=state.connect_timeout_s,
                          queues=queues)


def upgrade_ledger(
    data_dir: Path, state: StateSettings | None = None, *, environ: Mapping[str, str] | None = None,
) -> tuple[int | None, int]:
    """Create the configured ledger's schema or migrate it to this version; return (before, after).

    ``before`` is ``None`` when there was no ledger. Safe to run again, and on several
    hosts at once.

    Raises
    ------
    ConfigError
        If the database cannot be reached or holds a newer schema than this node knows.
    """
    if state is None or state.backend == "sqlite":
        from dicom_node.state.sqlite import SqliteLedger, stored_version

        path = data_dir / LEDGER_FILE
        before = stored_version(path)
        SqliteLedger(path).close()
        return before, SCHEMA_VERSION
    _require_psycopg()
    from dicom_node.state.postgres_schema import connect, upgrade_schema

    assert state.dsn is not None
    password = state.password(os.environ if environ is None else environ)
    db = connect(state.dsn, password, connect_timeout_s=state.connect_timeout_s)
    try:
        return upgrade_schema(db)
    finally:
        db.close()


def _require_psycopg() -> None:
    if importlib.util.find_spec("psycopg") is None:  # optional: only the scaled-out mode needs it
        raise ConfigError(
            "state.backend: 'postgresql' needs the PostgreSQL client library psycopg, which is"
            " not installed: pip install 'dicom-node[postgresql]'"
        )
