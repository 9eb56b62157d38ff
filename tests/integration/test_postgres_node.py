"""The node with its ledger in PostgreSQL and a worker on its own host: a real cluster, a real study, a kill -9 while the job runs."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import StoreScpProcess, run_storescu, wait_until
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CROP_SERIES = HIPPO_DICOM / "Study1" / "13_HCropVolume"



def test_kill_while_job_runs_then_restart_delivers_once(
    storescp: StoreScpProcess, make_node: Callable[..., NodeProcess], postgres_state: dict[str, Any]
) -> None:
    # With its ledger in PostgreSQL the node runs analyses through the job queue: here on a
    # worker it starts on its own host, killed with it; the job comes back by stalled-job recovery.
    config = {"state": postgres_state,
              "queue": {"serve_runs_analyses": True, "heartbeat_s": 1.0, "stalled_after_s": 3.0,
                        "recover_interval_s": 1.0},
              "analyses": {"hippocampus": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                                           "options": {"delay_s": 6.0}}}}
    node = make_node(destinations={"pacs": (storescp.aet, storescp.host, storescp.port)}, config=config)
    node.start()
    run_storescu([CROP_SERIES], node.port, called_aet="DICOMNODE")
    wait_until(lambda: any(j.state == "running" for j in node.ledger().job_rows()),
               deadline_s=60, what="job running")
    assert node.ledger().counts().instances == 32  # every acknowledged instance is in PostgreSQL
    node.kill()
    node.start()
    wait_until(lambda: Counter(d.state for j in node.ledger().job_rows() for d in j.deliveries)["sent"] == 1,
               deadline_s=120, what="results sent")
    (job,) = node.ledger().job_rows()
    assert job.state == "done" and job.attempts == 2
    assert job.summary["measurements"]
    time.sleep(1.0)
    sops = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received())
    assert len(sops) == 3 and set(sops.values()) == {1}
    assert not (node.data_dir / "ledger.sqlite3").exists()  # the state lives in PostgreSQL only
