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
import os
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

from deploy.local.node_process import NodeProcess, _children  # noqa: E402
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


def busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all processes), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and their children."""
    total = 0.0
    for pid in pids + [child for pid in pids for child in _children(pid)]:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
          torch_threads: int) -> Iterator[tuple[NodeProcess, list[int]]]:
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
        worker_pids = []
        for n in range(workers):
            worker = WorkerProcess(node.config_file, work / f"worker-{n}")
            worker.start()
            stack.callback(worker.stop)
            assert worker.pid is not None
            worker_pids.append(worker.pid)
        yield node, worker_pids


def measure(node: NodeProcess, worker_pids: list[int], folder: Path, studies: int,
            probes: int) -> tuple[float, float, float, float]:
    """Return (studies per minute, median enqueue-to-start ms of an idle set-up, CPU seconds per
    study of the whole machine, CPU seconds per study of the worker processes)."""
    batch = fresh_studies(folder / "batch", studies)
    busy, in_workers = busy_cpu_s(), tree_cpu_s(worker_pids)
    start = time.monotonic()
    run_storescu(batch, node.port, called_aet="DICOMNODE")
    wait_sent(node, studies)
    per_minute = studies / ((time.monotonic() - start) / 60.0)
    busy, in_workers = (busy_cpu_s() - busy) / studies, (tree_cpu_s(worker_pids) - in_workers) / studies
    overheads = []
    for n, study in enumerate(fresh_studies(folder / "probes", probes)):
        run_storescu([study], node.port, called_aet="DICOMNODE")
        wait_sent(node, studies + n + 1)
        newest = node.ledger().job_rows(limit=1)[0]
        assert newest.started_at is not None
        overheads.append((newest.started_at - newest.created_at) * 1000.0)
    return per_minute, statistics.median(overheads), busy, in_workers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--probes", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="workers.torch_threads of every worker (0: torch's default, all cores)")
    args = parser.parse_args()

    results: dict[str, tuple[float, float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dicom-node-scale-") as tmp, running_cluster() as cluster:
        os.environ["DICOM_NODE_DB_PASSWORD"] = cluster.password
        pacs = StoreScpProcess(Path(tmp) / "pacs")
        pacs.start()
        try:
            for name, database, workers in (("embedded (SQLite, 1 local worker)", None, 0),
                                            ("PostgreSQL, 1 worker", cluster, 1),
                                            ("PostgreSQL, 2 workers", cluster, 2)):
                work = Path(tmp) / f"run-{len(results)}"
                with setup(work, pacs, database, workers, args.torch_threads) as (node, pids):
                    results[name] = measure(node, pids, work, args.studies, args.probes)
                per_minute, overhead, busy, in_workers = results[name]
                print(f"{name:<36} {per_minute:6.1f} studies/min   enqueue->start {overhead:7.1f} ms"
                      f"   CPU per study: {busy:.2f} s in all" + (f", {in_workers:.2f} s in workers" if pids else ""),
                      flush=True)
        finally:
            pacs.stop()
    (embedded, pg1, pg2) = results.values()
    print(f"\nPostgreSQL hand-off overhead over embedded: {pg1[1] - embedded[1]:+.1f} ms per job"
          f" (target <= 50 ms)")
    print(f"2 workers / 1 worker: {pg2[0] / pg1[0]:.2f}x studies per minute (target >= 1.6x)")
    print(f"PostgreSQL 1 worker / embedded: {pg1[0] / embedded[0]:.2f}x studies per minute")
    # Whatever the number of workers, N cores can finish at most N / (CPU seconds per study)
    # studies per second, unless the work per study shrinks: that bounds what 2 workers can give
    # against the rate measured with 1.
    cores = os.cpu_count() or 1
    w, everything = pg1[3], pg1[2]
    ceiling = cores / everything * 60.0 / pg1[0]
    print(f"CPU per study with 1 worker: {everything:.2f} s, {w:.2f} s of it in the worker and"
          f" {everything - w:.2f} s elsewhere (receiver, scheduler, sender, PostgreSQL, DCMTK);"
          f" {cores} cores finish at most {cores / everything * 60.0:.1f} studies/min,"
          f" {ceiling:.2f}x the rate of 1 worker")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
