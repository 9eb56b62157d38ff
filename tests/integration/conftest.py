"""Fixtures that start real peers on 127.0.0.1: Orthanc and a DCMTK storescp stand-in node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import OrthancProcess, StoreScpProcess, free_port
from dicom_node.config import dump_toml
from tests.conftest import REPO
from tests.postgres import Cluster

TEST_STABLE_AGE_S = 1
"""StableAge for tests: OnStableStudy fires about 1-2 s after the last instance."""

_call_failed = pytest.StashKey[bool]()


class OrthancOptions(TypedDict, total=False):
    """Keyword arguments of :class:`OrthancProcess` a test may choose."""

    node_aet: str
    node_host: str
    node_port: int
    stable_age_s: int | None
    overrides: Mapping[str, Any] | None
    config_path: Path
    http_port: int | None
    dicom_port: int | None


class OrthancFactory(Protocol):
    """The ``make_orthanc`` fixture: start one more Orthanc and return it."""

    def __call__(self, **options: Unpack[OrthancOptions]) -> OrthancProcess:
        """Start an Orthanc configured with ``options``."""


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember whether the test body failed, so fixtures can dump peer logs."""
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_call_failed] = True
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    return bool(request.node.stash.get(_call_failed, False))


@pytest.fixture
def storescp(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreScpProcess]:
    """A running DCMTK storescp (AE title DICOMNODE, free port) standing in for the node."""
    if shutil.which("storescp") is None:
        pytest.fail("storescp is not on PATH: run scripts/setup.sh (apt package dcmtk)")
    scp = StoreScpProcess(tmp_path / "storescp", aet="DICOMNODE")
    scp.start()
    yield scp
    scp.stop()
    if _failed(request):
        print(f"----- storescp log ({scp.log_file}) -----\n{scp.log_text()}")


@pytest.fixture
def make_orthanc(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OrthancFactory]:
    """Factory: ``make_orthanc(node_aet=..., node_host=..., node_port=..., **kwargs)``.

    Starts an Orthanc from the shipped orthanc.json and autoroute.lua (free ports, storage in
    ``tmp_path``, ``StableAge`` = ``TEST_STABLE_AGE_S`` unless given) whose ``dicom-node``
    modality points where asked. Every Orthanc started is stopped at teardown, and its log is
    printed when the test fails.
    """
    started: list[OrthancProcess] = []

    def make(**kwargs: Unpack[OrthancOptions]) -> OrthancProcess:
        kwargs.setdefault("stable_age_s", TEST_STABLE_AGE_S)
        if shutil.which("Orthanc") is None:
            pytest.fail("Orthanc is not on PATH: run scripts/setup.sh (apt package orthanc)")
        server = OrthancProcess(tmp_path / f"orthanc-{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()
        if _failed(request):
            server.dump_log(sys.stdout)


@pytest.fixture
def orthanc(make_orthanc: OrthancFactory, storescp: StoreScpProcess) -> OrthancProcess:
    """A running Orthanc (shipped config and Lua) whose ``dicom-node`` modality is ``storescp``."""
    return make_orthanc(node_aet=storescp.aet, node_host=storescp.host, node_port=storescp.port)


@pytest.fixture
def postgres_state(
    tmp_path: Path, postgres_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """A fresh database, its schema created by ``dicom-node db upgrade``; the password in the environment."""
    dsn = postgres_cluster.create_database(f"node_{tmp_path.name.lower().replace('-', '_')}")
    monkeypatch.setenv("DICOM_NODE_DB_PASSWORD", postgres_cluster.password)
    state = {"backend": "postgresql", "dsn": dsn}
    config = tmp_path / "upgrade.toml"
    config.write_text(dump_toml({"state": state}), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "created at schema version" in done.stdout
    return state


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """Make nodes (``NodeProcess`` arguments, a free port by default); stop each afterwards and
    print the end of its log, which pytest shows for a failed test."""
    nodes: list[NodeProcess] = []

    def make(**kwargs: Any) -> NodeProcess:
        kwargs.setdefault("port", free_port())
        node = NodeProcess(tmp_path / f"node-{len(nodes)}", **kwargs)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop(timeout_s=30)
        print(f"----- {node.log_file} -----\n{node.log_text()[-6000:]}")
