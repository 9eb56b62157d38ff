"""``dicom-node db upgrade``, and the node refusing a ledger whose schema it does not know."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.cli.main import main
from dicom_node.config import dump_toml
from dicom_node.state.schema import SCHEMA_VERSION
from dicom_node.state.sqlite import SqliteLedger
from tests.conftest import REPO
from tests.postgres import Cluster


def write_config(tmp_path: Path, state: dict[str, str]) -> Path:
    config = tmp_path / "node.toml"
    config.write_text(dump_toml({"node": {"data_dir": str(tmp_path / "data"), "port": 11199},
                                 "state": state}), encoding="utf-8")
    return config


def test_db_upgrade_creates_and_migrates_the_sqlite_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, {"backend": "sqlite"})
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"created at schema version {SCHEMA_VERSION}" in capsys.readouterr().out
    ledger = tmp_path / "data" / "ledger.sqlite3"
    assert SqliteLedger(ledger).counts().instances == 0
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"already at schema version {SCHEMA_VERSION}" in capsys.readouterr().out


def test_db_upgrade_then_status_on_postgresql(
    tmp_path: Path, postgres_cluster: Cluster, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn = postgres_cluster.create_database("cli_upgrade")
    secret = tmp_path / "db-password"
    secret.write_text(postgres_cluster.password + "\n", encoding="utf-8")
    config = write_config(tmp_path, {"backend": "postgresql", "dsn": dsn,
                                     "password_file": str(secret)})
    monkeypatch.delenv("DICOM_NODE_DB_PASSWORD", raising=False)
    assert main(["status", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"state.dsn: {dsn} holds no dicom-node ledger yet: run `dicom-node db upgrade --config node.toml`" in err
    assert main(["db", "upgrade", "--config", str(config)]) == 0
    assert f"postgresql ledger at {dsn}: created at schema version {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["status", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["instances"] == {"received": 0}
    assert not (tmp_path / "data" / "ledger.sqlite3").exists()  # nothing written beside it
    secret.write_text("wrong\n", encoding="utf-8")
    assert main(["status", "--config", str(config)]) == 2
    assert "password authentication failed" in capsys.readouterr().err


def test_serve_refuses_a_database_without_the_schema(tmp_path: Path, postgres_cluster: Cluster) -> None:
    dsn = postgres_cluster.create_database("serve_refuses")
    config = write_config(tmp_path, {"backend": "postgresql", "dsn": dsn})
    env = {**os.environ, "PYTHONPATH": str(REPO), "DICOM_NODE_DB_PASSWORD": postgres_cluster.password}
    done = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "run `dicom-node db upgrade --config node.toml`" in done.stderr
