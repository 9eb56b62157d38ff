"""The ledger's schema, in SQLite and in PostgreSQL, and the migrations that bring an older one up to date."""

from __future__ import annotations

import sqlite3

SCHEMA_VERSION = 8

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
    generation INTEGER NOT NULL DEFAULT 1,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at REAL,
    origin TEXT NOT NULL DEFAULT 'dicom',
    purged_at REAL,
    expected_instances INTEGER
);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    manufacturer TEXT NOT NULL DEFAULT '',
    rows INTEGER,
    columns INTEGER,
    orientation TEXT,
    pixel_spacing TEXT,
    slice_thickness REAL,
    number_of_frames INTEGER,
    convolution_kernel TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    calling_ae_title TEXT NOT NULL,
    received_at REAL NOT NULL,
    sha256 TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    analysis TEXT NOT NULL,
    series_uid TEXT,
    generation INTEGER NOT NULL,
    origin TEXT NOT NULL DEFAULT 'dicom',
    state TEXT NOT NULL CHECK (state IN
        ('queued', 'running', 'done', 'failed', 'not_applicable', 'superseded', 'cancelled')),
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    timings TEXT NOT NULL DEFAULT '{}',
    result_dir TEXT,
    summary TEXT NOT NULL DEFAULT '{}',
    options TEXT NOT NULL DEFAULT '{}',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_planned ON jobs (study_uid, analysis, series_uid, generation)
    WHERE origin <> 'api';
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead', 'superseded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    sent_at REAL,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS source_cursors (
    source TEXT PRIMARY KEY,
    last_change INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
"""


#: The same tables in PostgreSQL (first released at version 4; ``dicom-node db upgrade``
#: creates them). ``series.seq`` keeps the order series arrived in, as SQLite's rowid does.
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
    generation INTEGER NOT NULL DEFAULT 1,
    first_received_at DOUBLE PRECISION NOT NULL,
    last_received_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    origin TEXT NOT NULL DEFAULT 'dicom',
    purged_at DOUBLE PRECISION,
    expected_instances INTEGER
);
CREATE TABLE IF NOT EXISTS series (
    seq BIGSERIAL NOT NULL,
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    manufacturer TEXT NOT NULL DEFAULT '',
    "rows" INTEGER,
    "columns" INTEGER,
    orientation TEXT,
    pixel_spacing TEXT,
    slice_thickness DOUBLE PRECISION,
    number_of_frames INTEGER,
    convolution_kernel TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    sha256 TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id BIGSERIAL PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    study_uid TEXT NOT NULL,
    analysis TEXT NOT NULL,
    series_uid TEXT,
    generation INTEGER NOT NULL,
    origin TEXT NOT NULL DEFAULT 'dicom',
    state TEXT NOT NULL CHECK (state IN
        ('queued', 'running', 'done', 'failed', 'not_applicable', 'superseded', 'cancelled')),
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    timings TEXT NOT NULL DEFAULT '{}',
    result_dir TEXT,
    summary TEXT NOT NULL DEFAULT '{}',
    options TEXT NOT NULL DEFAULT '{}',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_planned ON jobs (study_uid, analysis, series_uid, generation)
    WHERE origin <> 'api';
CREATE TABLE IF NOT EXISTS deliveries (
    id BIGSERIAL PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs (id),
    destination TEXT NOT NULL,
    files TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead', 'superseded')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    last_error TEXT,
    sent_at DOUBLE PRECISION,
    UNIQUE (job_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS source_cursors (
    source TEXT PRIMARY KEY,
    last_change BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_workers (
    worker_id BIGINT PRIMARY KEY REFERENCES procrastinate_workers (id) ON DELETE CASCADE,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    analyses TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);
"""

#: The oldest schema version a PostgreSQL ledger can have.
POSTGRES_FIRST_VERSION = 4

#: What brings a PostgreSQL ledger from the version before each key to that version.
POSTGRES_MIGRATIONS = {
    5: "ALTER TABLE instances ADD COLUMN IF NOT EXISTS sha256 TEXT NOT NULL DEFAULT ''",
    6: "ALTER TABLE studies ADD COLUMN IF NOT EXISTS expected_instances INTEGER",
    # 7: the table source_cursors, created by POSTGRES_SCHEMA
    # 8: the table fleet_workers (who each queue worker is), created by POSTGRES_SCHEMA
}

#: What an admin runs when the ledger's schema is missing or older than this node's.
UPGRADE_COMMAND = "dicom-node db upgrade --config node.toml"


def migrate(db: sqlite3.Connection) -> None:
    """Bring a ledger of an earlier schema up to date, keeping every row.

    Version 8 changes nothing in SQLite (it adds the PostgreSQL queue's fleet_workers).
    Version 7 adds the table source_cursors (created by SCHEMA on any ledger). Version 6 adds
    studies.expected_instances. Version 5 adds instances.sha256. Version 4 adds studies.purged_at. Version 3 adds series.convolution_kernel. Version 2 adds studies.origin, jobs.options and jobs.cancel_requested, and turns the
    jobs' table-level UNIQUE into a partial index that API jobs are exempt from; a table
    constraint cannot be dropped, so jobs is rebuilt (https://sqlite.org/lang_altertable.html).
    """
    series = {row[1] for row in db.execute("PRAGMA table_info(series)")}
    if series and "convolution_kernel" not in series:  # version 3
        db.execute("ALTER TABLE series ADD COLUMN convolution_kernel TEXT NOT NULL DEFAULT ''")
    instances = {row[1] for row in db.execute("PRAGMA table_info(instances)")}
    if instances and "sha256" not in instances:  # version 5
        db.execute("ALTER TABLE instances ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
    studies = {row[1] for row in db.execute("PRAGMA table_info(studies)")}
    if studies and "origin" not in studies:
        db.execute("ALTER TABLE studies ADD COLUMN origin TEXT NOT NULL DEFAULT 'dicom'")
    if studies and "purged_at" not in studies:  # version 4
        db.execute("ALTER TABLE studies ADD COLUMN purged_at REAL")
    if studies and "expected_instances" not in studies:  # version 6
        db.execute("ALTER TABLE studies ADD COLUMN expected_instances INTEGER")
    columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    if not columns or "options" in columns:
        return
    create = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS jobs"):]
    create = create[: create.index(");") + 2].replace("IF NOT EXISTS jobs", "jobs_v2")
    kept = ", ".join(columns)
    db.execute("PRAGMA foreign_keys=OFF")  # deliveries keep their job ids across the rebuild
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(create)
        db.execute(f"INSERT INTO jobs_v2 ({kept}) SELECT {kept} FROM jobs")
        db.execute("DROP TABLE jobs")
        db.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    db.execute("PRAGMA foreign_keys=ON")
