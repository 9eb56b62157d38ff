"""Scale-out: studies per minute and per-job queue overhead, embedded default against PostgreSQL with 1 and 2 workers.

In one run: a throwaway PostgreSQL cluster (deploy/local/postgres_cluster.py), DCMTK storescp as
the PACS, the hippocampus analysis on CPU. For each set-up, ``--studies`` HippoCrop studies (new
UIDs) are sent at once and the clock runs from the first instance sent to the last result
delivered (studies per minute); then ``--probes`` single studies are sent one at a time to an idle
set-up and each job's enqueue-to-start time (ledger ``created_at`` to ``started_at``) is taken:
the hand-off overhead of the queue. Printed as a table and as ratios. Not part of the test suite.
From the repository root:

    .venv/bin/python -m benchmarks.scale_out [--studies 20] [--probes 5] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deploy.local.node_process import NodeProcess  # noqa: E402
from deploy.local.orthanc_process import StoreScpProcess, free_port, run_storescu  # noqa: E402
from deploy.local.postgres_cluster import Cluster, running_cluster  # noqa: E402
from deploy.local.worker_process import WorkerProcess  # noqa: E402

CROP = REPO / "deploy" / "demo-data" / "Study1-HippoCrop"


def fresh_studies(folder: Path, count: int) -> list[Path]:
    """``count`` copies of the demo crop series, each under new study, series and instance UIDs."""
    sources = [pydicom.dcmread(p) for p in sorted(CROP.glob("*.dcm"))]
    studies = []
    for n in range(count):
        study, series = str(generate_uid()), str(generate_uid())
        out = folder / f"study-{n:03d}"
        out.mkdir(parents=True)
        for index, source in enumerate(sources):
            ds = source.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = str(generate_uid())
            ds.save_as(out / f"{index:03d}.dcm")
        studies.append(out)
    return studies


def sent(node: NodeProcess) -> int:
    return sum(1 for job in node.ledger().job_rows(limit=1000) for d in job.deliveries if d.state == "sent")


def wait_sent(node: NodeProcess, count: int, deadline_s: float = 900.0) -> None:
    deadline = time.monotonic() + deadline_s
    while sent(node) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sent(node)} of {count} results sent:\n{node.log_text()[-3000:]}")
        time.sleep(0.2)


@contextmanager
def setup(work: Path, pacs: StoreScpProcess, cluster: Cluster | None, workers: int,
          torch_threads: int) -> Iterator[NodeProcess]:
    """The node (and its workers), running; stopped afterwards."""
    config: dict[str, object] = {
        "grouping": {"quiet_period_s": 0.5, "max_wait_s": 600.0},
        "workers": {"device": "cpu", "cpu_workers": 1, "job_timeout_s": 600.0,
                    "torch_threads": torch_threads},
    }
    if cluster is not None:
        dsn = cluster.create_database(f"bench_{work.name.replace('-', '_')}")
        config["state"] = {"backend": "postgresql", "dsn": dsn}
    node = NodeProcess(work, port=free_port(), destinations={"pacs": (pacs.aet, pacs.host, pacs.port)},
                       config=config)
    with ExitStack() as stack:
        if cluster is not None:
            import subprocess

            subprocess.run([sys.executable, "-m", "dicom_node.cli", "db", "upgrade", "--config",
                            str(node.config_file)], check=True, capture_output=True, cwd=REPO, timeout=120)
        node.start()
        stack.callback(node.stop)
        for n in range(workers):
            worker = WorkerProcess(node.config_file, work / f"worker-{n}")
            worker.start()
            stack.callback(worker.stop)
        yield node


def measure(node: NodeProcess, folder: Path, studies: int, probes: int) -> tuple[float, float]:
    """Return (studies per minute, median enqueue-to-start ms of an idle set-up)."""
    batch = fresh_studies(folder / "batch", studies)
    start = time.monotonic()
    run_storescu(batch, node.port, called_aet="DICOMNODE")
    wait_sent(node, studies)
    per_minute = studies / ((time.monotonic() - start) / 60.0)
    overheads = []
    for n, study in enumerate(fresh_studies(folder / "probes", probes)):
        run_storescu([study], node.port, called_aet="DICOMNODE")
        wait_sent(node, studies + n + 1)
        newest = node.ledger().job_rows(limit=1)[0]
        assert newest.started_at is not None
        overheads.append((newest.started_at - newest.created_at) * 1000.0)
    return per_minute, statistics.median(overheads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="workers.torch_threads of every worker (0: torch's default, all cores)")
    args = parser.parse_args()
    import os

    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dicom-node-scale-") as tmp, running_cluster() as cluster:
        os.environ["DICOM_NODE_DB_PASSWORD"] = cluster.password
        pacs = StoreScpProcess(Path(tmp) / "pacs")
        pacs.start()
        try:
            for name, database, workers in (("embedded (SQLite, 1 local worker)", None, 0),
                                            ("PostgreSQL, 1 worker", cluster, 1),
                                            ("PostgreSQL, 2 workers", cluster, 2)):
                work = Path(tmp) / f"run-{len(results)}"
                with setup(work, pacs, database, workers, args.torch_threads) as node:
                    results[name] = measure(node, work, args.studies, args.probes)
                print(f"{name:<36} {results[name][0]:6.1f} studies/min   enqueue->start"
                      f" {results[name][1]:7.1f} ms", flush=True)
        finally:
            pacs.stop()
    (embedded, pg1, pg2) = results.values()
    print(f"\nPostgreSQL hand-off overhead over embedded: {pg1[1] - embedded[1]:+.1f} ms per job"
          f" (target <= 50 ms)")
    print(f"2 workers / 1 worker: {pg2[0] / pg1[0]:.2f}x studies per minute (target >= 1.6x)")
    print(f"PostgreSQL 1 worker / embedded: {pg1[0] / embedded[0]:.2f}x studies per minute")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
