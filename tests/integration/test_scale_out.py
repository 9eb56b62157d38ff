"""Scaled out: one receiving node, two workers with their own data folders, PostgreSQL and the procrastinate queue."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import StoreScpProcess, free_port, run_storescu, wait_until
from deploy.local.worker_process import WorkerProcess
from dicom_node.cli.main import main
from dicom_node.config import dump_toml
from tests.conftest import HIPPO_CROP_STUDY1, REPO
from tests.integration.test_tls import make_certificates
from tests import postgres
from tests.postgres import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def distinct_studies(folder: Path, count: int) -> list[Path]:
    """Copies of the HippoCrop series, each a study of its own (new study, series and SOP UIDs)."""
    sources = [pydicom.dcmread(p) for p in sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))]
    studies = []
    for n in range(count):
        study_uid, series_uid = generate_uid(), generate_uid()
        out = folder / f"study-{n}"
        out.mkdir(parents=True)
        for index, source in enumerate(sources):
            ds = source.copy()
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(out / f"{index:03d}.dcm")
        studies.append(out)
    return studies


@pytest.fixture
def scaled_out(
    tmp_path: Path, request: pytest.FixtureRequest, storescp: StoreScpProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., tuple[NodeProcess, list[WorkerProcess]]]]:
    """Start a receiving node and workers on one fresh database; stop them all afterwards."""
    started: list[NodeProcess | WorkerProcess] = []

    def start(workers: int, analyses: dict[str, Any], cluster: Cluster | None = None,
              queue: dict[str, Any] | None = None, api: dict[str, Any] | None = None,
              destination: tuple[str, str, int] | None = None, port: int | None = None,
              node_settings: dict[str, Any] | None = None) -> tuple[NodeProcess, list[WorkerProcess]]:
        if cluster is None:
            cluster = request.getfixturevalue("postgres_cluster")
        assert cluster is not None
        monkeypatch.setenv("DICOM_NODE_DB_PASSWORD", cluster.password)
        dsn = cluster.create_database(f"scale_{tmp_path.name.lower().replace('-', '_')}")
        config = {
            "state": {"backend": "postgresql", "dsn": dsn},
            "queue": {"heartbeat_s": 1.0, "stalled_after_s": 3.0, "recover_interval_s": 1.0,
                      "stop_grace_s": 60.0, **(queue or {})},
            "analyses": analyses,
            **({"api": api} if api else {}),
            **({"node": node_settings} if node_settings else {}),
        }
        node = NodeProcess(tmp_path / "receiver", port=port or free_port(),
                           destinations={"pacs": destination or (storescp.aet, storescp.host, storescp.port)},
                           config=config)
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "db", "upgrade", "--config", str(node.config_file)],
            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        node.start()
        started.append(node)
        pool = [WorkerProcess(node.config_file, tmp_path / f"worker-{n}") for n in range(workers)]
        for worker in pool:
            worker.start()
            started.append(worker)
        return node, pool

    yield start
    for process in reversed(started):
        process.stop(timeout_s=30)
        print(f"----- {process.log_file} -----\n{process.log_text()[-4000:]}")


def sent_jobs(node: NodeProcess) -> int:
    return sum(1 for j in node.ledger().job_rows() for d in j.deliveries if d.state == "sent")


def test_a_killed_worker_s_job_runs_again_elsewhere_and_results_arrive_once(
    tmp_path: Path, storescp: StoreScpProcess, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    slow = {"hippocampus": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                            "options": {"delay_s": 3.0}}}
    node, workers = scaled_out(2, slow)
    studies = distinct_studies(tmp_path / "studies", 4)
    run_storescu(studies, node.port, called_aet="DICOMNODE")
    victim_job = wait_until(
        lambda: next((m.group(1) for w in workers[:1]
                      for m in [re.search(r"job (\S+) running on", w.log_text())] if m), None),
        deadline_s=60, what="a job running on the first worker", poll_s=0.2,
    )
    workers[0].kill()  # kill -9 mid-job: its model process too, as a host that vanishes
    killed_at = time.monotonic()
    wait_until(lambda: sent_jobs(node) == 4, deadline_s=180, what="every study's results sent", poll_s=0.5)
    jobs = {j.uid: j for j in node.ledger().job_rows()}
    assert len(jobs) == 4 and all(j.state == "done" for j in jobs.values())
    assert jobs[victim_job].attempts == 2
    assert f"job {victim_job} running on" in workers[1].log_text()  # it ran again on the other
    assert "queued again" in node.log_text() and victim_job in node.log_text()
    time.sleep(1.0)
    sops = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received())
    assert len(sops) == 4 * 3 and set(sops.values()) == {1}  # SEG, SC and SR of every study, once
    assert time.monotonic() - killed_at < 120
    fleet = {w["pid"]: w for w in node.ledger().workers(3.0)}  # type: ignore[attr-defined]
    assert fleet[workers[0].pid]["silent"] and not fleet[workers[1].pid]["silent"]  # the killed one, as seen
    assert workers[1].stop(timeout_s=30) == 0  # SIGTERM: a clean exit
    assert workers[1].pid not in {w["pid"] for w in node.ledger().workers(3.0)}  # type: ignore[attr-defined]


def test_a_cuda_only_analysis_is_never_taken_by_a_cpu_worker(
    tmp_path: Path, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    analyses = {"hippocampus": {"plugin": "hippocampus", "devices": ["cuda"]},
                "gaussian-blur": {"plugin": "inference.blur.task:GaussianBlurTask", "enabled": False}}
    node, workers = scaled_out(0, analyses)
    with pytest.raises(RuntimeError, match="no enabled analysis may run on cpu"):
        WorkerProcess(node.config_file, tmp_path / "cpu-worker").start()
    run_storescu(distinct_studies(tmp_path / "studies", 1), node.port, called_aet="DICOMNODE")
    wait_until(lambda: [j.state for j in node.ledger().job_rows()] == ["queued"], deadline_s=60,
               what="the job queued")
    depths = node.ledger().queue_depths(3.0)  # type: ignore[attr-defined]
    assert depths == {"hippocampus@cuda": {"todo": 1, "doing": 0, "stalled": 0, "retrying": 0, "dead": 0}}
    time.sleep(3.0)
    assert [j.state for j in node.ledger().job_rows()] == ["queued"]  # still waiting
    shown = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--config", str(node.config_file)],
                           capture_output=True, text=True, timeout=60, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"hippocampus@cuda\s+1 / 0", shown.stdout), shown.stdout
    assert "Workers (0)" in shown.stdout


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own: the test restarts it."""
    reason = postgres.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres.running_cluster() as cluster:
        yield cluster


def test_postgresql_restarted_mid_run_loses_and_duplicates_nothing(
    tmp_path: Path, storescp: StoreScpProcess, own_cluster: Cluster,
    scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    slow = {"hippocampus": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                            "options": {"delay_s": 2.0}}}
    node, workers = scaled_out(1, slow, own_cluster)
    studies = distinct_studies(tmp_path / "studies", 4)
    run_storescu(studies[:3], node.port, called_aet="DICOMNODE")
    wait_until(lambda: "running on" in workers[0].log_text(), deadline_s=60, what="a job running")
    own_cluster.restart_immediately()  # as a crash of the database server
    run_storescu(studies[3:], node.port, called_aet="DICOMNODE")
    wait_until(lambda: sent_jobs(node) == 4, deadline_s=180, what="every study's results sent", poll_s=0.5)
    jobs = node.ledger().job_rows()
    assert len(jobs) == 4 and all(j.state == "done" for j in jobs)  # none lost, none twice
    assert node.ledger().counts().instances == 4 * 32
    time.sleep(1.0)
    sops = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received())
    assert len(sops) == 4 * 3 and set(sops.values()) == {1}
    assert node.process is not None and node.process.poll() is None  # the receiver carried on
    assert workers[0].process is not None and workers[0].process.poll() is None  # so did the worker


def test_serve_runs_analyses_on_its_own_host_when_asked(
    tmp_path: Path, storescp: StoreScpProcess, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    node, _ = scaled_out(0, {"hippocampus": {"plugin": "hippocampus"}},
                         queue={"serve_runs_analyses": True})
    found = wait_until(lambda: re.search(r"started a local worker on cpu \(pid (\d+)\)", node.log_text()),
                       deadline_s=30, what="the local worker started")
    run_storescu(distinct_studies(tmp_path / "studies", 1), node.port, called_aet="DICOMNODE")
    wait_until(lambda: sent_jobs(node) == 1, deadline_s=120, what="results sent")
    assert node.stop(timeout_s=60) == 0
    assert not Path(f"/proc/{found.group(1)}").exists()  # the local worker stopped with the node


def http_queue(api_port: int) -> dict[str, Any]:
    return {"instances": "http", "receiver_url": f"http://127.0.0.1:{api_port}"}


def test_workers_fetch_instances_over_https_with_a_private_ca_and_return_results(
    tmp_path: Path, storescp: StoreScpProcess, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The node's API serves HTTPS with a certificate of a CA made here; a worker trusting another
    CA refuses it and runs nothing; workers trusting this CA (node.tls) fetch, run and upload."""
    certs = make_certificates(tmp_path / "certs")
    elsewhere = make_certificates(tmp_path / "other-ca")
    api_port = free_port()
    tls = {"certificate": str(certs["node"]), "private_key": str(certs["node.key"]),
           "ca_certificates": str(certs["ca"])}
    node, _ = scaled_out(0, {"hippocampus": {"plugin": "hippocampus"}},
                         queue={"instances": "http", "receiver_url": f"https://127.0.0.1:{api_port}"},
                         api={"enabled": True, "host": "127.0.0.1", "port": api_port, "token": "s3cret-token"},
                         node_settings={"tls": tls})
    run_storescu(distinct_studies(tmp_path / "studies", 3), node.port, called_aet="DICOMNODE",
                 extra_args=["+tls", str(certs["client.key"]), str(certs["client"]), "+cf", str(certs["ca"])])
    wait_until(lambda: [j.state for j in node.ledger().job_rows()] == ["queued"] * 3, deadline_s=60,
               what="three jobs queued")
    wrong_ca = tmp_path / "wrong-ca.toml"
    wrong_ca.write_text(dump_toml({**node.config, "node": {**node.config["node"],
                                                            "tls": {**tls, "ca_certificates": str(elsewhere["ca"])}}}))
    with pytest.raises(RuntimeError, match=rf"refusing https://127.0.0.1:{api_port}: its certificate is not trusted"):
        WorkerProcess(wrong_ca, tmp_path / "wrong-ca-worker").start()
    assert [(j.state, j.attempts) for j in node.ledger().job_rows()] == [("queued", 0)] * 3  # nothing ran
    workers = [WorkerProcess(node.config_file, tmp_path / f"worker-{n}") for n in range(2)]
    try:
        for worker in workers:
            worker.start()
        wait_until(lambda: sent_jobs(node) == 3, deadline_s=180, what="every study's results sent", poll_s=0.5)
        fetched = sum(w.log_text().count(f"instance(s) fetched from https://127.0.0.1:{api_port} (32)")
                      for w in workers)
        assert fetched == 3
        assert all(job.state == "done" for job in node.ledger().job_rows())
        assert node.ledger().due_deliveries(time.time() + 1e6) == []  # nothing left to send
        trusted = ssl.create_default_context(cafile=certs["ca"])
        fleet = json.loads(urllib.request.urlopen(f"https://127.0.0.1:{api_port}/fleet", timeout=10,
                                                  context=trusted).read())
        assert fleet["mode"] == "queue" and len(fleet["workers"]) == 2  # the status page's fleet view
        assert all(w["job_uid"] is None and w["heartbeat_age_s"] < 5 for w in fleet["workers"])
        assert sorted((w["host"], w["device"], w["pid"], tuple(w["analyses"])) for w in fleet["workers"]) == sorted(
            (socket.gethostname(), "cpu", worker.pid, ("gaussian-blur", "hippocampus")) for worker in workers)
        assert fleet["queues"] == {}  # nothing waiting, running, stalled, retrying or dead
        assert main(["status", "--config", str(node.config_file), "--limit", "1"]) == 0
        shown = capsys.readouterr().out
        for worker in workers:
            assert re.search(rf"worker \d+  {re.escape(socket.gethostname())} cpu pid {worker.pid}  heartbeat \d+ s ago"
                             r"  idle\n      analyses: gaussian-blur, hippocampus\n", shown), shown
        metrics = urllib.request.urlopen(f"https://127.0.0.1:{api_port}/metrics", timeout=10,
                                         context=trusted).read().decode()
        for worker in workers:
            assert re.search(r'dicom_node_worker_heartbeat_age_seconds{device="cpu",'
                             rf'host="{re.escape(socket.gethostname())}",pid="{worker.pid}",worker="\d+"}}', metrics)
    finally:
        for worker in workers:
            worker.stop(timeout_s=30)
    receiver_results = node.data_dir / "results"
    assert len(list(receiver_results.glob("*/*.dcm"))) == 3 * 3  # uploaded to the receiving node
    for worker in workers:
        assert not any((worker.data_dir / "cache").glob("*/*"))  # each job's cache was dropped
    time.sleep(1.0)
    sops = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received())
    assert len(sops) == 3 * 3 and set(sops.values()) == {1}


def test_an_instance_that_changed_after_receipt_fails_its_job(
    tmp_path: Path, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    api_port = free_port()
    node, _ = scaled_out(0, {"hippocampus": {"plugin": "hippocampus"}}, queue=http_queue(api_port),
                         api={"enabled": True, "host": "127.0.0.1", "port": api_port, "token": "s3cret-token"})
    run_storescu(distinct_studies(tmp_path / "studies", 1), node.port, called_aet="DICOMNODE")
    wait_until(lambda: [j.state for j in node.ledger().job_rows()] == ["queued"], deadline_s=60,
               what="the job queued")
    spooled = sorted((node.data_dir / "spool").glob("*/*/*.dcm"))
    (job,) = node.ledger().job_rows()

    def get(sop_instance_uid: str) -> tuple[int, bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{api_port}/transfer/jobs/{job.uid}/instances/{sop_instance_uid}",
            headers={"Authorization": "Bearer s3cret-token"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as refused:
            return refused.code, b""

    assert get(spooled[0].stem) == (200, spooled[0].read_bytes())  # streamed as stored
    assert get("1.2.3.4")[0] == 404  # not in the job's series
    assert get("..%2F..%2F..%2Fnode.toml")[0] == 404  # never a path outside the spool
    hidden = spooled[1].with_suffix(".away")
    spooled[1].rename(hidden)
    assert get(spooled[1].stem)[0] == 410  # in the series, but not in this node's spool
    hidden.rename(spooled[1])
    victim = spooled[5]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    victim.write_bytes(bytes(data))
    worker = WorkerProcess(node.config_file, tmp_path / "worker")
    worker.start()
    try:
        wait_until(lambda: [j.state for j in node.ledger().job_rows()] == ["failed"], deadline_s=60,
                   what="the job failed")
    finally:
        worker.stop(timeout_s=30)
    (job,) = node.ledger().job_rows()
    assert f"instance {victim.stem} from http://127.0.0.1:{api_port} does not match the manifest" in (job.reason or "")


def test_orthanc_routes_ten_studies_to_a_receiver_and_two_workers_with_a_worker_killed(
    tmp_path: Path, make_orthanc: Callable[..., Any],
    scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    """The issue's scenario: real Orthanc and its routing script, no shared spool path, results once."""
    from tests.integration.test_end_to_end import study_results

    node_port, api_port = free_port(), free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    slow = {"hippocampus": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                            "options": {"delay_s": 1.5}}}
    node, workers = scaled_out(
        2, slow, queue=http_queue(api_port), port=node_port,
        api={"enabled": True, "host": "127.0.0.1", "port": api_port, "token": "s3cret-token"},
        destination=(orthanc.aet, "127.0.0.1", orthanc.dicom_port),
    )
    studies = distinct_studies(tmp_path / "studies", 10)
    study_uids = [str(pydicom.dcmread(next(s.glob("*.dcm"))).StudyInstanceUID) for s in studies]
    run_storescu(studies, orthanc.dicom_port, called_aet=orthanc.aet)
    wait_until(lambda: "running on" in workers[0].log_text(), deadline_s=120, what="a job on worker 0")
    workers[0].kill()
    wait_until(lambda: sent_jobs(node) == 10, deadline_s=300, what="all ten studies' results sent", poll_s=1.0)
    time.sleep(2.0)
    for study_uid in study_uids:
        results = study_results(orthanc, study_uid)
        assert [len(results[k]) for k in ("SEG", "SC", "SR")] == [1, 1, 1], study_uid
        for kind in ("SEG", "SC", "SR"):
            assert len(results[kind][0]["Instances"]) == 1  # exactly once
    jobs = node.ledger().job_rows(limit=50)
    assert len(jobs) == 10 and all(j.state == "done" for j in jobs)
    assert sorted(j.attempts for j in jobs) == [1] * 9 + [2]  # the killed worker's job ran again
    assert sum(w.log_text().count("instance(s) fetched from") for w in workers) >= 10


def test_two_receivers_one_ledger_complete_a_study_once(
    tmp_path: Path, storescp: StoreScpProcess, scaled_out: Callable[..., tuple[NodeProcess, list[WorkerProcess]]],
) -> None:
    """Half a study at each receiver: one job, whose worker (no shared spool) fetches each half from
    the receiver holding it, skipping a third that is down; the study resent to the other after a
    failover: no second job."""
    api_ports, down = (free_port(), free_port()), f"http://127.0.0.1:{free_port()}"
    urls = [f"http://127.0.0.1:{port}" for port in api_ports]
    api = {"enabled": True, "host": "127.0.0.1", "token": "s3cret-token"}
    node, workers = scaled_out(1, {"hippocampus": {"plugin": "hippocampus"}},
                               queue={"instances": "http", "receiver_urls": [*urls, down]},
                               api={**api, "port": api_ports[0]})
    other = NodeProcess(tmp_path / "receiver-2", port=free_port(),
                        destinations={"pacs": (storescp.aet, storescp.host, storescp.port)},
                        config={"state": node.config["state"], "queue": node.config["queue"],
                                "analyses": node.config["analyses"], "api": {**api, "port": api_ports[1]}})
    other.start()
    try:
        (study,) = distinct_studies(tmp_path / "studies", 1)
        files = sorted(study.glob("*.dcm"))
        run_storescu(files[:16], node.port, called_aet="DICOMNODE")
        run_storescu(files[16:], other.port, called_aet="DICOMNODE")
        wait_until(lambda: sent_jobs(node) == 1, deadline_s=120, what="results sent")
        run_storescu(files, other.port, called_aet="DICOMNODE")  # resent after a failover
        time.sleep(4.0)  # two quiet periods and a few scheduling rounds on both receivers
        (job,) = node.ledger().job_rows()
        assert job.state == "done" and job.generation == 1 and job.attempts == 1
        assert node.ledger().counts().instances == 32
    finally:
        other.stop(timeout_s=30)
    log = workers[0].log_text()
    assert f"job {job.uid}: 32 instance(s) fetched from {urls[0]} (16), {urls[1]} (16) and verified" in log
    assert f"job {job.uid}: receiving node {down} skipped: cannot reach" in log
    assert len(list((node.data_dir / "results" / job.uid).glob("*.dcm"))) == 3  # uploaded to the first
    assert not (other.data_dir / "results" / job.uid).exists()
    sops = Counter(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received())
    assert len(sops) == 3 and set(sops.values()) == {1}
