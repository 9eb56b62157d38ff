"""The Storage SCP on a PostgreSQL ledger: while the database is down, a C-STORE is refused, never acknowledged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node import status
from dicom_node.config import NodeSettings, StateSettings
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from dicom_node.state.ledger import open_ledger, upgrade_ledger
from deploy.local.orthanc_process import free_port
from tests import postgres
from tests.integration.test_receiver import good_dataset, send_dataset
from tests.postgres import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: the test stops and restarts it."""
    reason = postgres.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres.running_cluster() as cluster:
        yield cluster


def test_database_down_answers_out_of_resources_then_recovers(tmp_path: Path, own_cluster: Cluster) -> None:
    dsn = own_cluster.create_database("receiver")
    state = StateSettings(backend="postgresql", dsn=dsn, connect_timeout_s=2)
    environ = {"DICOM_NODE_DB_PASSWORD": own_cluster.password}
    upgrade_ledger(tmp_path, state, environ=environ)
    ledger = open_ledger(tmp_path, state, environ=environ)
    settings = NodeSettings(host="127.0.0.1", port=free_port(), data_dir=tmp_path, min_free_disk_bytes=0,
                            allowed_calling_ae_titles=("PYSCU",))
    scp = StorageSCP(settings, Spool(tmp_path / "spool"), ledger)
    scp.start()
    try:
        ds = good_dataset()
        own_cluster.pg_ctl("stop", "-m", "immediate")
        rsp = send_dataset(scp, ds)
        assert rsp.Status == status.OUT_OF_RESOURCES
        assert "cannot record instance in the ledger" in str(rsp.get("ErrorComment", ""))
        assert scp.counters.stored == 0
        own_cluster.start()
        rsp = send_dataset(scp, ds)  # the sender retries; the pool opens fresh connections
        assert rsp.Status == status.SUCCESS
        assert ledger.counts().instances == 1
        study = ledger.study(str(ds.StudyInstanceUID))
        assert study is not None and study.instance_count == 1
    finally:
        scp.stop()
        ledger.close()
