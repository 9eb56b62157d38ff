"""Connecting to the PostgreSQL ledger, and creating or migrating its schema (``dicom-node db upgrade``)."""

from __future__ import annotations

import re

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

    Runs in one transaction under an advisory lock, so two hosts upgrading at once do it
    once. Idempotent: a database already at this version is left as it is.

    Raises
    ------
    ConfigError
        If the database holds a newer schema than this node knows.
    """
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_UPGRADE_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        before = schema_version(db)
        if before is not None and before > SCHEMA_VERSION:
            raise ConfigError(newer_message(before))
        queue_table = db.execute("SELECT to_regclass('procrastinate_jobs') AS name").fetchone()
        if queue_table is not None and queue_table["name"] is None:
            from procrastinate.schema import SchemaManager

            db.execute(SchemaManager.get_schema())  # the job queue, of the pinned procrastinate
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


def newer_message(version: int) -> str:
    """The refusal for a schema written by a newer dicom-node."""
    return (
        f"the ledger has schema version {version}, written by a newer dicom-node (this one"
        f" knows up to {SCHEMA_VERSION}): run the newer version on every host"
    )


def safe_dsn(dsn: str) -> str:
    """The dsn as it may be logged: a password in it (refused by the configuration) is masked."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", dsn)
