"""The PostgreSQL ledger where it differs from one box: its schema is upgraded explicitly, several processes share it."""

from __future__ import annotations

import itertools
import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.config import StateSettings
from dicom_node.errors import ConfigError
from dicom_node.state.ledger import Ledger, open_ledger, upgrade_ledger
from dicom_node.state.records import InstanceRecord, PlannedJob
from dicom_node.state.schema import SCHEMA_VERSION
from dicom_node.state.sqlite import SqliteLedger
from tests.postgres import Cluster

SERIES = {
    "modality": "MR", "description": "HippoCrop", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "manufacturer": "", "rows": 51, "columns": 35, "orientation": "[1,0,0,0,1,0]",
    "pixel_spacing": "[1,1]", "slice_thickness": 1.0, "number_of_frames": None,
}
_names = itertools.count()


def record(sop: str, at: float, study: str = "1.2", series: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop, series, study, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"/spool/{sop}.dcm", 1000, "ORTHANC", at)


@pytest.fixture
def database(postgres_cluster: Cluster) -> tuple[StateSettings, dict[str, str]]:
    """An empty database: its [state] settings and the environment carrying the password."""
    dsn = postgres_cluster.create_database(f"pg_{next(_names)}")
    return (StateSettings(backend="postgresql", dsn=dsn),
            {"DICOM_NODE_DB_PASSWORD": postgres_cluster.password})


def test_an_empty_database_is_refused_naming_the_command(
    tmp_path: Path, database: tuple[StateSettings, dict[str, str]]
) -> None:
    state, environ = database
    with pytest.raises(ConfigError) as caught:
        open_ledger(tmp_path, state, environ=environ)
    assert "holds no dicom-node ledger yet: run `dicom-node db upgrade --config node.toml`" in str(caught.value)
    assert upgrade_ledger(tmp_path, state, environ=environ) == (None, SCHEMA_VERSION)
    assert upgrade_ledger(tmp_path, state, environ=environ) == (SCHEMA_VERSION, SCHEMA_VERSION)
    open_ledger(tmp_path, state, environ=environ).close()


def test_an_older_or_newer_schema_is_refused(
    tmp_path: Path, database: tuple[StateSettings, dict[str, str]]
) -> None:
    import psycopg

    state, environ = database
    upgrade_ledger(tmp_path, state, environ=environ)
    assert state.dsn is not None
    with psycopg.connect(state.dsn, password=environ["DICOM_NODE_DB_PASSWORD"], autocommit=True) as db:
        db.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer dicom-node"):
            open_ledger(tmp_path, state, environ=environ)
        with pytest.raises(ConfigError, match="written by a newer dicom-node"):
            upgrade_ledger(tmp_path, state, environ=environ)  # never downgrades
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        with pytest.raises(ConfigError, match=r"has ledger schema version 3, this node needs"
                                              rf" {SCHEMA_VERSION}: run `dicom-node db upgrade"):
            open_ledger(tmp_path, state, environ=environ)


def test_a_wrong_password_names_the_dsn_key(
    tmp_path: Path, database: tuple[StateSettings, dict[str, str]]
) -> None:
    state, _ = database
    with pytest.raises(ConfigError) as caught:
        open_ledger(tmp_path, state, environ={"DICOM_NODE_DB_PASSWORD": "wrong"})
    message = str(caught.value)
    assert message.startswith(f"state.dsn: cannot connect to {state.dsn}: ")
    assert "password authentication failed" in message and "wrong" not in message.replace(
        "password authentication failed", "")


def test_a_newer_sqlite_ledger_is_refused(tmp_path: Path) -> None:
    SqliteLedger(tmp_path / "ledger.sqlite3").close()
    db = sqlite3.connect(tmp_path / "ledger.sqlite3")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer"):
        open_ledger(tmp_path)


@pytest.fixture
def ledgers(tmp_path: Path, database: tuple[StateSettings, dict[str, str]]) -> Iterator[list[Ledger]]:
    """Four ledgers on one upgraded database, as four processes (receivers, workers) would open it."""
    state, environ = database
    upgrade_ledger(tmp_path, state, environ=environ)
    opened = [open_ledger(tmp_path, state, environ=environ) for _ in range(4)]
    yield opened
    for ledger in opened:
        ledger.close()


def test_concurrent_claimers_each_take_a_different_job(ledgers: list[Ledger]) -> None:
    """Four processes' worth of ledgers claim 40 jobs at once: each job is claimed exactly once."""
    for n in range(40):
        study = f"1.2.{n}"
        ledgers[0].record_instance(record(f"{study}.1.1", 1.0, study=study, series=f"{study}.1"), SERIES)
        assert ledgers[0].complete_study(study, 2.0, [PlannedJob("hippocampus", f"{study}.1")])
    claimed: list[list[str]] = [[] for _ in ledgers]
    start = threading.Barrier(len(ledgers))

    def claim_all(index: int) -> None:
        start.wait()
        while (job := ledgers[index].claim_next_job(3.0, ["hippocampus"])) is not None:
            claimed[index].append(job.uid)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(ledgers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    every = [uid for uids in claimed for uid in uids]
    assert len(every) == 40 and len(set(every)) == 40
    assert ledgers[0].counts().jobs == {"running": 40}


def test_two_receivers_complete_a_study_once(ledgers: list[Ledger]) -> None:
    """Both receivers hold the study and both find it due: one set of jobs is created."""
    ledgers[0].record_instance(record("1.2.3.1", 1.0), SERIES)
    assert not ledgers[1].record_instance(record("1.2.3.1", 1.5), SERIES)  # resent to the other
    assert ledgers[1].record_instance(record("1.2.3.2", 2.0), SERIES)
    created: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def complete(index: int) -> None:
        start.wait()
        created[index] = ledgers[index].complete_study(
            "1.2", 10.0, [PlannedJob("hippocampus", "1.2.3")], instances_seen=2)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(len(uids) for uids in created) == [0, 1]
    assert len(ledgers[0].job_rows()) == 1


def test_a_lost_connection_is_replaced(ledgers: list[Ledger], postgres_cluster: Cluster) -> None:
    """The server ends every session (as a restart does): the next call gets a fresh connection."""
    import psycopg

    ledger = ledgers[0]
    ledger.record_instance(record("1.2.3.1", 1.0), SERIES)
    with psycopg.connect(postgres_cluster.dsn(), password=postgres_cluster.password,
                         autocommit=True) as admin:
        ended = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                              " WHERE application_name = 'dicom-node'").fetchone()
    assert ended is not None and ended[0] >= 1
    study = ledger.study("1.2")
    assert study is not None and study.instance_count == 1


def test_a_version_4_database_is_migrated_keeping_its_rows(
    tmp_path: Path, database: tuple[StateSettings, dict[str, str]]
) -> None:
    import psycopg

    state, environ = database
    upgrade_ledger(tmp_path, state, environ=environ)
    ledger = open_ledger(tmp_path, state, environ=environ)
    ledger.record_instance(record("1.2.3.1", 1.0), SERIES)
    ledger.close()
    assert state.dsn is not None
    with psycopg.connect(state.dsn, password=environ["DICOM_NODE_DB_PASSWORD"], autocommit=True) as db:
        db.execute("ALTER TABLE instances DROP COLUMN sha256")
        db.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    assert upgrade_ledger(tmp_path, state, environ=environ) == (4, SCHEMA_VERSION)
    ledger = open_ledger(tmp_path, state, environ=environ)
    (entry,) = ledger.manifest("1.2.3")
    assert entry.sop_instance_uid == "1.2.3.1" and entry.sha256 == ""
    ledger.close()


OLD_QUEUE_SCHEMA = Path(__file__).parent / "data" / "procrastinate-3.3.0-schema.sql"

#: The queue's objects as PostgreSQL describes them: tables' columns, functions' signatures
#: and bodies, indexes, triggers and types, so two databases can be compared.
QUEUE_CATALOG = """
SELECT 'column', table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable
       || ' ' || coalesce(column_default, '')
  FROM information_schema.columns WHERE table_name LIKE 'procrastinate%'
UNION ALL
SELECT 'function', p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') '
       || pg_get_function_result(p.oid) || ' ' || md5(p.prosrc)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' AND p.proname LIKE 'procrastinate%'
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE tablename LIKE 'procrastinate%'
UNION ALL
SELECT 'trigger', pg_get_triggerdef(t.oid) FROM pg_trigger t WHERE NOT t.tgisinternal
UNION ALL
SELECT 'type', t.typname || ' ' || coalesce(string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder), '')
  FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid
 WHERE t.typname LIKE 'procrastinate%' GROUP BY t.typname
ORDER BY 1, 2
"""


def queue_catalog(dsn: str, password: str) -> list[tuple[str, str]]:
    import psycopg

    with psycopg.connect(dsn, password=password, autocommit=True) as db:
        return [(str(kind), str(text)) for kind, text in db.execute(QUEUE_CATALOG).fetchall()]


def test_db_upgrade_migrates_an_older_procrastinate_queue_to_the_installed_one(
    tmp_path: Path, postgres_cluster: Cluster
) -> None:
    """A queue set up by procrastinate 3.3.0 gets the shipped migrations since: the same objects as a fresh one."""
    import procrastinate
    import psycopg

    environ = {"DICOM_NODE_DB_PASSWORD": postgres_cluster.password}
    fresh = StateSettings(backend="postgresql", dsn=postgres_cluster.create_database(f"pg_{next(_names)}"))
    old = StateSettings(backend="postgresql", dsn=postgres_cluster.create_database(f"pg_{next(_names)}"))
    assert upgrade_ledger(tmp_path, fresh, environ=environ) == (None, SCHEMA_VERSION)
    assert fresh.dsn is not None and old.dsn is not None
    with psycopg.connect(old.dsn, password=postgres_cluster.password, autocommit=True) as db:
        db.execute(OLD_QUEUE_SCHEMA.read_text(encoding="utf-8").encode())
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('procrastinate_version', '3.3.0')")
    before = queue_catalog(old.dsn, postgres_cluster.password)
    after_fresh = queue_catalog(fresh.dsn, postgres_cluster.password)
    assert ("function", "procrastinate_retry_job_v2") not in {(k, t.split("(")[0]) for k, t in before}
    assert before != after_fresh  # 3.3.0's queue lacks what 3.4.0 added
    assert upgrade_ledger(tmp_path, old, environ=environ) == (None, SCHEMA_VERSION)
    assert queue_catalog(old.dsn, postgres_cluster.password) == after_fresh
    with psycopg.connect(old.dsn, password=postgres_cluster.password, autocommit=True) as db:
        recorded = db.execute("SELECT value FROM meta WHERE key = 'procrastinate_version'").fetchone()
    assert recorded == (procrastinate.__version__,)
    open_ledger(tmp_path, old, environ=environ).close()


def test_db_upgrade_keeps_the_installed_queue_and_refuses_a_newer_or_unknown_one(
    tmp_path: Path, postgres_cluster: Cluster, database: tuple[StateSettings, dict[str, str]]
) -> None:
    import procrastinate
    import psycopg

    state, environ = database
    upgrade_ledger(tmp_path, state, environ=environ)
    assert state.dsn is not None
    catalog = queue_catalog(state.dsn, postgres_cluster.password)
    with psycopg.connect(state.dsn, password=postgres_cluster.password, autocommit=True) as db:
        def record(version: str) -> None:
            db.execute("UPDATE meta SET value = %s WHERE key = 'procrastinate_version'", (version,))

        assert db.execute("SELECT value FROM meta WHERE key = 'procrastinate_version'").fetchone() == (
            procrastinate.__version__,)
        assert upgrade_ledger(tmp_path, state, environ=environ) == (SCHEMA_VERSION, SCHEMA_VERSION)
        assert queue_catalog(state.dsn, postgres_cluster.password) == catalog  # same version: nothing
        record("99.0.0")
        with pytest.raises(ConfigError, match=r"job queue's schema is of procrastinate 99\.0\.0, newer than"
                                              rf" the installed {re.escape(procrastinate.__version__)}"):
            upgrade_ledger(tmp_path, state, environ=environ)
        with pytest.raises(ConfigError, match=r"job queue of procrastinate 99\.0\.0, this node has"
                                              r" .*: run `dicom-node db upgrade"):
            open_ledger(tmp_path, state, environ=environ)
        record("three")
        with pytest.raises(ConfigError, match="recorded as procrastinate 'three', not a version"):
            upgrade_ledger(tmp_path, state, environ=environ)
        assert db.execute("SELECT value FROM meta WHERE key = 'procrastinate_version'").fetchone() == (
            "three",)  # the refused upgrade changed nothing
