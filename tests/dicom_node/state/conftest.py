"""The ledger under test, once per backend: SQLite in a temporary folder, PostgreSQL in a throwaway cluster."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.config import StateSettings
from dicom_node.state.ledger import Ledger, open_ledger, upgrade_ledger
from tests.postgres import Cluster

_databases = itertools.count()

#: Opens the same store again, as a restarted node (or another host) would.
OpenLedger = Callable[[], Ledger]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_again(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenLedger]:
    """Return a function that opens this test's ledger (a fresh, empty one per test)."""
    opened: list[Ledger] = []

    def track(ledger: Ledger) -> Ledger:
        opened.append(ledger)
        return ledger

    if request.param == "sqlite":
        yield lambda: track(open_ledger(tmp_path))
    else:
        cluster: Cluster = request.getfixturevalue("postgres_cluster")
        dsn = cluster.create_database(f"ledger_{next(_databases)}")
        state = StateSettings(backend="postgresql", dsn=dsn)
        environ = {"DICOM_NODE_DB_PASSWORD": cluster.password}
        upgrade_ledger(tmp_path, state, environ=environ)
        yield lambda: track(open_ledger(tmp_path, state, environ=environ))
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_again: OpenLedger) -> Ledger:
    return open_again()
