"""Pull mode against a real Orthanc started from the shipped orthanc-pull.json: catch up after downtime, fetch only wanted series, never twice."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import PULL_CONFIG, OrthancProcess, free_port, run_storescu, wait_until
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STUDY1 = HIPPO_DICOM / "Study1"
CROP_SERIES = STUDY1 / "13_HCropVolume"
T1POST_SERIES = STUDY1 / "12-T1post-05670"


class RecordingProxy:
    """An HTTP proxy in front of Orthanc that records every request it forwards (what Orthanc served)."""

    def __init__(self, target_port: int) -> None:
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.command, self.path))
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_POST = do_PUT = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def files_served(self) -> list[str]:
        """Orthanc instance ids whose DICOM file was downloaded."""
        return [path.split("/")[2] for method, path in self.requests
                if method == "GET" and path.startswith("/instances/") and path.endswith("/file")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def copy_series(source: Path, out: Path, study_uid: str) -> Path:
    """Write ``source`` again in study ``study_uid`` with new series and instance UIDs."""
    out.mkdir(parents=True)
    series_uid = generate_uid()
    for path in sorted(source.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(out / path.name)
    return out


@pytest.fixture
def proxy_factory() -> Iterator[Callable[[int], RecordingProxy]]:
    proxies: list[RecordingProxy] = []

    def make(port: int) -> RecordingProxy:
        proxies.append(RecordingProxy(port))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_pull_catches_up_fetches_only_wanted_series_and_never_twice(
    make_orthanc: Callable[..., OrthancProcess], proxy_factory: Callable[[int], RecordingProxy],
    tmp_path: Path,
) -> None:
    # Orthanc from the shipped pull configuration: no routing script; the node follows its change log
    orthanc = make_orthanc(config_path=PULL_CONFIG)
    assert orthanc.config["LuaScripts"] == []
    proxy = proxy_factory(orthanc.http_port)
    node = NodeProcess(
        tmp_path / "node", port=free_port(),
        destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
        config={"sources": {"pacs": {"ae_title": orthanc.aet, "url": proxy.url, "mode": "pull",
                                     "poll_interval_s": 0.5}}},
    )
    try:
        node.start()
        wait_until(lambda: node.ledger().source_cursor("pacs") is not None, 20, "the node's first poll")
        node.stop(timeout_s=30)

        # while the node is stopped: three studies it wants, one it does not (a 512x512 T1post only)
        wanted = [generate_uid() for _ in range(3)]
        unwanted = generate_uid()
        for index, uid in enumerate(wanted):
            run_storescu([copy_series(CROP_SERIES, tmp_path / f"study-{index}", uid)], orthanc.dicom_port,
                         called_aet=orthanc.aet)
        run_storescu([copy_series(T1POST_SERIES, tmp_path / "unwanted", unwanted)], orthanc.dicom_port,
                     called_aet=orthanc.aet)
        wait_until(lambda: sum(1 for c in orthanc.get_json("/changes?limit=1000")["Changes"]
                               if c["ChangeType"] == "StableStudy") >= 4, 30, "4 stable studies in Orthanc")

        node.start()
        ledger = node.ledger()

        def sent_jobs() -> list[Any]:
            jobs = [j for j in ledger.job_rows(limit=100) if j.analysis == "hippocampus" and j.state == "done"]
            return [j for j in jobs if j.deliveries and all(d.state == "sent" for d in j.deliveries)]

        wait_until(lambda: len(sent_jobs()) == 3, 180, "3 studies analysed and filed", poll_s=0.5)
        # a fourth study, stored while the node runs
        fourth = generate_uid()
        run_storescu([copy_series(CROP_SERIES, tmp_path / "study-3", fourth)], orthanc.dicom_port,
                     called_aet=orthanc.aet)
        wait_until(lambda: len(sent_jobs()) == 4, 120, "the fourth study analysed and filed", poll_s=0.5)
        jobs = sorted(sent_jobs(), key=lambda j: j.created_at)
        assert [j.study_uid for j in jobs] == [*wanted, fourth]  # caught up in order

        # results filed in each study in Orthanc
        for uid in [*wanted, fourth]:
            (study,) = [m for m in orthanc.lookup(uid) if m["Type"] == "Study"]
            modalities = sorted(s["MainDicomTags"].get("Modality") for s in orthanc.series(study["ID"]))
            assert modalities.count("SEG") == 1 and modalities.count("SR") == 1, modalities

        # Orthanc served the crop series of the four wanted studies, nothing of the unwanted one
        crop_instances = {
            i for uid in [*wanted, fourth]
            for m in orthanc.lookup(uid) if m["Type"] == "Study"
            for s in orthanc.series(m["ID"]) if s["MainDicomTags"].get("Modality") == "MR"
            for i in s["Instances"]
        }
        (unwanted_study,) = [m for m in orthanc.lookup(unwanted) if m["Type"] == "Study"]
        unwanted_instances = {i for s in orthanc.series(unwanted_study["ID"]) for i in s["Instances"]}
        served = proxy.files_served()
        assert sorted(served) == sorted(crop_instances)  # each once, and only those
        assert not set(served) & unwanted_instances
        assert ledger.study(unwanted) is None

        # the results filed back made the studies stable again: nothing is fetched or analysed again,
        # neither now nor after a restart
        cursor = ledger.source_cursor("pacs")
        wait_until(lambda: ledger.source_cursor("pacs") != cursor, 30, "the results' changes handled")
        node.stop(timeout_s=30)
        node.start()
        time.sleep(3.0)  # several polls
        assert len(proxy.files_served()) == len(served)
        hippocampus_jobs = [j for j in ledger.job_rows(limit=100) if j.analysis == "hippocampus"]
        assert len(hippocampus_jobs) == 4
        assert all(ledger.study(uid).generation == 1 for uid in [*wanted, fourth])  # type: ignore[union-attr]
    finally:
        node.stop(timeout_s=30)
        print(f"----- {node.log_file} -----\n{node.log_text()[-8000:]}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_push_and_pull_together_analyse_a_study_once(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path, backend: str, request: pytest.FixtureRequest,
) -> None:
    # On PostgreSQL the node runs its analyses through the job queue, on a worker of its own host.
    ledger_config = {} if backend == "sqlite" else {
        "state": request.getfixturevalue("postgres_state"), "queue": {"serve_runs_analyses": True}}
    node_port = free_port()
    # the shipped routing script pushes to the node, and the node pulls from the same Orthanc
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = NodeProcess(
        tmp_path / "node", port=node_port,
        destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
        config={"sources": {"pacs": {"ae_title": orthanc.aet, "url": orthanc.base_url, "mode": "pull",
                                     "poll_interval_s": 0.2}}, **ledger_config},
    )
    try:
        node.start()
        wait_until(lambda: node.ledger().source_cursor("pacs") is not None, 20, "the node's first poll")
        run_storescu([STUDY1], orthanc.dicom_port, called_aet=orthanc.aet)
        study_uid = str(pydicom.dcmread(next(CROP_SERIES.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)
        ledger = node.ledger()
        total = sum(1 for _ in STUDY1.rglob("*.dcm"))
        # the push delivers every routed series; the pull adds nothing new
        wait_until(lambda: sum(s.instance_count for s in ledger.series_of_study(study_uid)) == total, 60,
                   "every routed instance in the node")
        wait_until(lambda: [j for j in ledger.job_rows(study_uid=study_uid)
                            if j.deliveries and all(d.state == "sent" for d in j.deliveries)], 120,
                   "results sent")
        # let the results' own StableStudy change and the pulls that follow pass
        cursor = ledger.source_cursor("pacs")
        wait_until(lambda: ledger.source_cursor("pacs") != cursor, 30, "later changes handled")
        time.sleep(2.0)
        jobs = [j for j in ledger.job_rows(study_uid=study_uid) if j.analysis == "hippocampus"]
        assert len(jobs) == 1, jobs
        study = ledger.study(study_uid)
        assert study is not None and study.generation == 1
        (study_id,) = [m["ID"] for m in orthanc.lookup(study_uid) if m["Type"] == "Study"]
        modalities = [s["MainDicomTags"].get("Modality") for s in orthanc.series(study_id)]
        assert modalities.count("SEG") == 1 and modalities.count("SR") == 1
        # restarted, the node resumes from its cursor: nothing is pulled or analysed again
        node.stop(timeout_s=30)
        node.start()
        wait_until(lambda: node.log_text().count("pulling from source pacs") == 2, 20, "pulling again")
        time.sleep(2.0)  # several polls
        ledger = node.ledger()
        assert len([j for j in ledger.job_rows(study_uid=study_uid) if j.analysis == "hippocampus"]) == 1
        assert ledger.study(study_uid).generation == 1  # type: ignore[union-attr]
    finally:
        node.stop(timeout_s=30)


def test_first_pull_starts_now_or_at_the_beginning_and_wanted_series_only(
    make_orthanc: Callable[..., OrthancProcess], tmp_path: Path
) -> None:
    from dicom_node.config import NodeSettings, SourceSettings
    from dicom_node.receive.ingest import Ingestor
    from dicom_node.receive.pull import SourcePuller
    from dicom_node.receive.source import OrthancSource
    from dicom_node.receive.spool import Spool
    from dicom_node.state.sqlite import SqliteLedger
    from inference.hippocampus.analysis import HippocampusAnalysis

    orthanc = make_orthanc(config_path=PULL_CONFIG)
    crop_study, t1_study = generate_uid(), generate_uid()
    run_storescu([copy_series(CROP_SERIES, tmp_path / "crop", crop_study)], orthanc.dicom_port, called_aet=orthanc.aet)
    run_storescu([copy_series(T1POST_SERIES, tmp_path / "t1", t1_study)], orthanc.dicom_port, called_aet=orthanc.aet)
    wait_until(lambda: sum(1 for c in orthanc.get_json("/changes?limit=1000")["Changes"]
                           if c["ChangeType"] == "StableStudy") >= 2, 30, "2 stable studies")
    last = int(orthanc.get_json("/changes?last")["Last"])
    rules = {"hippocampus": HippocampusAnalysis().rule}

    def puller(name: str, pull_from: str) -> tuple[SourcePuller, SqliteLedger]:
        ledger = SqliteLedger(tmp_path / name / "ledger.sqlite3")
        ingestor = Ingestor(NodeSettings(min_free_disk_bytes=0), Spool(tmp_path / name / "spool"), ledger)
        settings = SourceSettings(ae_title=orthanc.aet, url=orthanc.base_url, mode="pull", pull_from=pull_from)  # type: ignore[arg-type]
        return SourcePuller(OrthancSource("pacs", settings), ingestor, ledger, rules, 20), ledger

    from_now, now_ledger = puller("now", "now")
    from_start, ledger = puller("beginning", "beginning")
    try:
        assert from_now.poll() == 0 and now_ledger.source_cursor("pacs") == last
        assert now_ledger.study(crop_study) is None  # what was stored before is not pulled

        assert from_start.poll() == 2  # both stable studies, in order
        assert ledger.source_cursor("pacs") == last
        (series,) = ledger.series_of_study(crop_study)
        assert series.instance_count == sum(1 for _ in CROP_SERIES.glob("*.dcm"))
        assert ledger.study(t1_study) is None  # no analysis wants it: nothing fetched
        assert from_start.poll() == 0  # nothing new
    finally:
        from_now.source.close()
        from_start.source.close()
