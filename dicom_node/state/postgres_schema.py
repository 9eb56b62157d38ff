"""Connecting to the PostgreSQL ledger, and creating or migrating its schema (``dicom-node db upgrade``)."""

from __future__ import annotations

import re
from pathlib import Path

import psycopg
from psycopg.rows import DictRow, dict_row

from dicom_node.errors import ConfigError
from dicom_node.state.schema import (
    POSTGRES_FIRST_VERSION,
    POSTGRES_MIGRATIONS,
    POSTGRES_SCHEMA,
    SCHEMA_VERSION,
)

#: Serialises concurrent ``db upgrade`` runs (pg_advisory_xact_lock key: "dicomnod").
_UPGRADE_LOCK = 0x6469636F6D6E6F64

Connection = psycopg.Connection[DictRow]


def connect(dsn: str, password: str | None, *, connect_timeout_s: float = 10.0) -> Connection:
    """Open one autocommit connection; explicit transactions are :meth:`Connection.transaction`.

    Raises
    ------
    ConfigError
        If the server cannot be reached or refuses the credentials; the message names
        ``state.dsn`` and the server's reason (never the password).
    """
    try:
        return psycopg.connect(
            dsn, password=password, autocommit=True, row_factory=dict_row,
            connect_timeout=max(1, round(connect_timeout_s)), application_name="dicom-node",
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"state.dsn: cannot connect to {safe_dsn(dsn)}: {reason}") from None


def schema_version(db: Connection) -> int | None:
    """Return the ledger schema version recorded in the database, or ``None`` when it has none."""
    row = db.execute("SELECT to_regclass('meta') IS NOT NULL AS present").fetchone()
    if row is None or not row["present"]:
        return None
    found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if found is None else int(found["value"])


def upgrade_schema(db: Connection) -> tuple[int | None, int]:
    """Create the ledger's tables, or bring them up to this version; return (before, after).

    procrastinate's job queue is installed or migrated in the same transaction
    (:func:`upgrade_queue_schema`). Runs under an advisory lock, so two hosts upgrading at
    once do it once. Idempotent: a database already at this version is left as it is.

    Raises
    ------
    ConfigError
        If the database holds a newer schema than this node knows, or a job queue of a
        newer or unknown procrastinate.
    """
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        before = schema_version(db)
        if before is not None and before > SCHEMA_VERSION:
            raise ConfigError(newer_message(before))
        upgrade_queue_schema(db)
        if before is None or before < SCHEMA_VERSION:
            assert before is None or before >= POSTGRES_FIRST_VERSION
            for version, step in sorted(POSTGRES_MIGRATIONS.items()):
                if before is not None and before < version:
                    db.execute(step)
            db.execute(POSTGRES_SCHEMA)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                (str(SCHEMA_VERSION),),
            )
    return before, SCHEMA_VERSION


def procrastinate_version() -> str:
    """The installed procrastinate's version: the schema of the job queue this node expects."""
    import procrastinate

    return str(procrastinate.__version__)


def queue_schema_version(db: Connection) -> str | None:
    """Return the procrastinate version whose schema the database holds, or ``None`` when unrecorded."""
    found = db.execute("SELECT value FROM meta WHERE key = 'procrastinate_version'").fetchone()
    return None if found is None else str(found["value"])


def upgrade_queue_schema(db: Connection) -> list[str]:
    """Install procrastinate's schema, or bring it up to the installed procrastinate; return the files applied.

    Runs in the caller's transaction (:func:`upgrade_schema`). The version whose schema the
    database holds is recorded in ``meta`` (``procrastinate_version``). An older one gets
    procrastinate's shipped migrations (``procrastinate/sql/migrations/*.sql``) that are
    newer than it and not newer than the installed procrastinate, in order. A database
    whose queue predates the record was installed by a dicom-node pinned to this same
    procrastinate release (3.10.0, the first one dicom-node used), so it is recorded as such.

    Raises
    ------
    ConfigError
        If the recorded version is not a version number, or newer than the installed
        procrastinate (never downgraded).
    """
    from procrastinate.schema import SchemaManager

    installed = procrastinate_version()
    queue_table = db.execute("SELECT to_regclass('procrastinate_jobs') AS name").fetchone()
    applied: list[str] = []
    if queue_table is not None and queue_table["name"] is None:
        db.execute(SchemaManager.get_schema())  # the job queue, of the pinned procrastinate
    else:
        recorded = queue_schema_version(db) or installed
        before = _release(recorded)
        if before is None:
            raise ConfigError(f"the job queue's schema is recorded as procrastinate {recorded!r}, not a"
                              " version this dicom-node knows: restore the database or repair meta")
        latest = _release(installed)
        assert latest is not None  # procrastinate's own version number
        if before > latest:
            raise ConfigError(f"the job queue's schema is of procrastinate {recorded}, newer than the"
                              f" installed {installed}: install dicom-node with that procrastinate on"
                              " every host")
        for path in queue_migrations(before, latest):
            db.execute(path.read_text(encoding="utf-8"))
            applied.append(path.name)
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('procrastinate_version', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        (installed,),
    )
    return applied


def queue_migrations(after: tuple[int, ...], up_to: tuple[int, ...]) -> list[Path]:
    """Return procrastinate's shipped migration files of releases after ``after`` up to ``up_to``, in order.

    Their names start with the release they belong to (``03.04.00_01_pre_...sql``); within a
    release, pre-migrations (``_01``) come before post-migrations (``_50``).
    """
    from procrastinate.schema import SchemaManager

    chosen = []
    for path in sorted(Path(SchemaManager.get_migrations_path()).glob("*.sql")):
        release = _release(path.name.split("_", 1)[0])
        if release is not None and after < release <= up_to:
            chosen.append(path)
    return chosen


def _release(version: str) -> tuple[int, ...] | None:
    """``3.10.0`` or ``03.10.00`` as ``(3, 10, 0)``; ``None`` for anything else."""
    found = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", version.strip())
    if found is None:
        return None
    return tuple(int(part) for part in found.groups())


def newer_message(version: int) -> str:
    """The refusal for a schema written by a newer dicom-node."""
    return (
        f"the ledger has schema version {version}, written by a newer dicom-node (this one"
        f" knows up to {SCHEMA_VERSION}): run the newer version on every host"
    )


def safe_dsn(dsn: str) -> str:
    """The dsn as it may be logged: a password in it (refused by the configuration) is masked."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", dsn)
