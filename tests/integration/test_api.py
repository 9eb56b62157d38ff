"""The HTTP API of a real node process: jobs in, derived series out, errors naming fields, metrics."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from scipy import ndimage

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import StoreScpProcess, free_port, wait_until
from inference.blur.filter import sigma_voxels
from inference.volume import load_series_files
from tests.conftest import HIPPO_CROP_STUDY1, HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "test-token-123"
WHOLE_HEAD = HIPPO_DICOM / "Study1"  # its 512x512 series are not hippocampus crops


class Api:
    """urllib calls to the node's API: ``(status, decoded JSON or text)``."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def __call__(self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            status, raw, kind = error.code, error.read(), error.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in kind else raw.decode()

    def wait_final(self, uid: str, deadline_s: float = 60) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            status, body = self("GET", f"/jobs/{uid}")
            assert status in (200, 202), body
            return body if status == 200 else None

        result: dict[str, Any] = wait_until(final, deadline_s=deadline_s, what=f"job {uid} final", poll_s=0.2)
        return result


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScpProcess]:
    scp = StoreScpProcess(tmp_path_factory.mktemp("pacs"), aet="PACS")
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: StoreScpProcess) -> Iterator[tuple[NodeProcess, Api]]:
    api_port = free_port()
    config = {
        "api": {"enabled": True, "port": api_port, "token": TOKEN,
                "job_names": {"3dblur": "gaussian-blur", "slowjob": "slow"}},
        "tasks": {"gaussian-blur": {"plugin": "inference.blur.task:GaussianBlurTask",
                                    "series_numbers": {"derived": 8801}},
                  "slow": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                           "options": {"delay_s": 4.0}}},
    }
    work_dir = tmp_path_factory.mktemp("node")
    config["node"] = {"log_file": str(work_dir / "debug.log")}
    process = NodeProcess(work_dir, port=free_port(),
                          destinations={"pacs": (pacs.aet, pacs.host, pacs.port)}, config=config)
    process.start()
    yield process, Api(api_port)
    process.stop()
    print(process.log_text()[-6000:])


def test_blur_job_on_a_folder_files_a_derived_series_that_matches_scipy(
    node: tuple[NodeProcess, Api], pacs: StoreScpProcess
) -> None:
    _, api = node
    status, body = api("POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(HIPPO_CROP_STUDY1)},
                                         "options": {"sigma_mm": 2.0}})
    assert status == 201 and set(body) >= {"uid"}
    status, first = api("GET", f"/jobs/{body['uid']}")
    assert status in (200, 202) and first["task"] == "gaussian-blur" and first["origin"] == "api"
    job = api.wait_final(body["uid"])
    assert job["status"] == "done", job["reason"]
    derived = job["outputs"]["derived_series"]
    assert len(derived["sop_instance_uids"]) == 32 and derived["description"] == "Gaussian blur sigma 2 mm"
    assert {"load", "infer", "report"} <= set(job["timings"])
    wait_until(lambda: api("GET", f"/jobs/{body['uid']}")[1]["deliveries"][0]["state"] == "sent",
               deadline_s=30, what="derived series sent")
    received = [p for p in pacs.received()
                if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == derived["series_instance_uid"]]
    assert len(received) == 32
    source = load_series_files(sorted(HIPPO_CROP_STUDY1.glob("*.dcm")))
    result = load_series_files(received)
    np.testing.assert_allclose(result.affine, source.affine)  # same geometry, slice for slice
    reference = ndimage.gaussian_filter(source.array.astype(np.float64),
                                        sigma_voxels([2.0] * 3, source.spacing_mm), truncate=4.0)
    assert np.abs(result.array - reference).max() <= 0.5 + 1e-4  # stored values are rounded
    header = pydicom.dcmread(received[0])
    assert header.ImageType[0] == "DERIVED" and header.SeriesNumber == 8801
    assert header.SeriesInstanceUID != source.series_instance_uid
    assert header.StudyInstanceUID == pydicom.dcmread(next(HIPPO_CROP_STUDY1.glob("*.dcm"))).StudyInstanceUID


def test_bad_requests_name_the_field_and_changes_need_the_token(node: tuple[NodeProcess, Api]) -> None:
    _, api = node
    good = {"task": "gaussian-blur", "input": {"dir": str(HIPPO_CROP_STUDY1)}}
    assert api("POST", "/jobs", good, token=None)[0] == 401
    assert api("POST", "/jobs", good, token="wrong")[0] == 401
    assert api("DELETE", "/jobs/whatever", token=None)[0] == 401
    assert api("POST", "/jobs/whatever/retry", token=None)[0] == 401
    cases = [
        ({**good, "task": "nope"}, "task", "unknown task 'nope'"),
        ({"input": good["input"]}, "task", "Field required"),
        ({"task": "gaussian-blur", "input": {}}, "input", "exactly one of dir and study_instance_uid"),
        ({**good, "options": {"sigma_mm": -2}}, "options.sigma_mm", "not negative"),
        ({**good, "options": {"radius": 1}}, "options.radius", "unknown option"),
        ({"task": "gaussian-blur", "input": {"dir": "/no/such/folder"}}, "input.dir", "not an absolute path"),
        ({"task": "gaussian-blur", "input": {"study_instance_uid": "1.2.3.4"}}, "input.study_instance_uid",
         "not received"),
        ({"task": "hippocampus", "input": {"dir": str(HIPPO_CROP_STUDY1)}, "options": {"x": 1}}, "options",
         "takes no options"),
    ]
    for body, field, message in cases:
        status, answer = api("POST", "/jobs", body)
        assert status == 422, (body, answer)
        assert any(e["field"] == field and message in e["message"] for e in answer["errors"]), answer
    assert api("GET", "/jobs/no-such-job")[0] == 404
    status, schema = api("GET", "/openapi.json", token=None)
    assert status == 200 and {"/jobs", "/jobs/{uid}", "/jobs/{uid}/retry", "/studies", "/healthz"} <= set(schema["paths"])
    assert api("GET", "/healthz", token=None)[1]["status"] == "ok"


def test_study_jobs_cancel_retry_filters_and_metrics(node: tuple[NodeProcess, Api]) -> None:
    _, api = node
    study_uid = str(pydicom.dcmread(next(HIPPO_CROP_STUDY1.glob("*.dcm"))).StudyInstanceUID)
    api("POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(HIPPO_CROP_STUDY1)}})  # study known
    wait_until(lambda: not api("GET", "/jobs?state=queued")[1]["jobs"]
               and not api("GET", "/jobs?state=running")[1]["jobs"], deadline_s=60, what="idle")
    status, slow = api("POST", "/jobs", {"task": "slow", "input": {"study_instance_uid": study_uid}})
    assert status == 201
    status, blur = api("POST", "/jobs", {"task": "gaussian-blur", "input": {"study_instance_uid": study_uid},
                                         "options": {"sigma_mm": [1, 2, 2]}})
    assert status == 201
    wait_until(lambda: api("GET", f"/jobs/{slow['uid']}")[1]["status"] == "running", deadline_s=30, what="running")
    status, cancelled = api("DELETE", f"/jobs/{blur['uid']}")  # queued behind the slow job: cancelled at once
    assert status == 200 and cancelled["status"] == "cancelled"
    status, stopping = api("DELETE", f"/jobs/{slow['uid']}")
    assert status == 200 and stopping["cancel_requested"]
    assert api("GET", f"/jobs/{slow['uid']}")[0] == 202
    ended = api.wait_final(slow["uid"])
    assert ended["status"] == "cancelled" and "discarded" in ended["reason"] and "outputs" not in ended
    assert api("DELETE", f"/jobs/{slow['uid']}")[0] == 409
    listed = api("GET", f"/jobs?state=cancelled&task=gaussian-blur&study={study_uid}")[1]["jobs"]
    assert [j["uid"] for j in listed] == [blur["uid"]]
    assert api("POST", f"/jobs/{blur['uid']}/retry")[1]["status"] == "queued"
    retried = api.wait_final(blur["uid"])
    assert retried["status"] == "done" and retried["options"]["sigma_mm"] == [1.0, 2.0, 2.0]
    # a series the task cannot use gives a not_applicable job with the reason
    head = next(p for p in sorted(WHOLE_HEAD.iterdir()) if p.is_dir() and "HCrop" not in p.name)
    head_series = str(pydicom.dcmread(next(head.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    status, body = api("POST", "/jobs", {"task": "hippocampus",
                                         "input": {"dir": str(head), "series_instance_uid": head_series}})
    assert status == 201
    status, na = api("GET", f"/jobs/{body['uid']}")
    assert status == 200 and na["status"] == "not_applicable" and "no series matches" in na["reason"]
    studies = api("GET", "/studies")[1]["studies"]
    assert study_uid in {s["study_uid"] for s in studies}
    families = {f.name: f for f in text_string_to_metric_families(api("GET", "/metrics", token=None)[1])}
    stages = {s.labels["stage"] for s in families["dicom_node_stage_seconds"].samples
              if s.name.endswith("_count") and s.value > 0}
    assert {"receive", "wait", "queue", "load", "infer", "report", "send"} <= stages
    outcomes = {(s.labels["analysis"], s.labels["outcome"]): s.value
                for s in families["dicom_node_jobs_finished"].samples if s.name.endswith("_total")}
    assert outcomes[("slow", "cancelled")] == 1 and outcomes[("gaussian-blur", "done")] >= 2
    received = {s.labels["origin"]: s.value for s in families["dicom_node_instances_received"].samples
                if s.name.endswith("_total")}
    assert received["api"] >= 32
    depth = {s.labels["queue"]: s.value for s in families["dicom_node_queue_depth"].samples}
    assert depth["jobs"] == 0


def _series_uid(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_a_folder_job_runs_on_the_series_in_that_folder_not_an_older_one(node: tuple[NodeProcess, Api]) -> None:
    _, api = node
    status, first = api("POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(HIPPO_CROP_STUDY1)}})
    assert status == 201 and api.wait_final(first["uid"])["status"] == "done"  # the study is known now
    t1post = WHOLE_HEAD / "12-T1post-05670"  # same study, a series the node has not had
    status, second = api("POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(t1post)},
                                           "options": {"sigma_mm": 1.0}})
    assert status == 201
    job = api.wait_final(second["uid"], deadline_s=120)
    assert job["status"] == "done", job["reason"]
    assert job["series_instance_uid"] == _series_uid(t1post) != _series_uid(HIPPO_CROP_STUDY1)
    derived = job["outputs"]["derived_series"]
    assert len(derived["sop_instance_uids"]) == len(list(t1post.iterdir())) == 22


def test_job_server_calls_as_the_processing_pipeline_made_them(node: tuple[NodeProcess, Api]) -> None:
    process, api = node
    jobs_root = process.data_dir / "jobs"
    shutil.copytree(HIPPO_CROP_STUDY1, jobs_root / "dicom_data")
    status, body = api("POST", "/job/", {"job_name": "3dblur", "in_dir": "dicom_data"})
    assert status == 201 and set(body) == {"uid"}, body

    def completed() -> dict[str, Any] | None:
        status, answer = api("GET", f"/query/{body['uid']}")
        assert status in (200, 202), answer
        if status == 202:
            assert answer["msg"] == "Job is running"
            return None
        return dict(answer)

    done = wait_until(completed, deadline_s=60, what="job completed", poll_s=0.2)
    assert done["msg"] == "Job has completed"
    output_dir = Path(done["output_dir"])
    images = sorted(output_dir.glob("derived-*.dcm"))
    assert len(images) == 32
    source = load_series_files(sorted((jobs_root / "dicom_data").glob("*.dcm")))
    result = load_series_files(images)
    np.testing.assert_allclose(result.affine, source.affine)
    reference = ndimage.gaussian_filter(source.array.astype(np.float64),
                                        sigma_voxels([2.0] * 3, source.spacing_mm), truncate=4.0)
    assert np.abs(result.array - reference).max() <= 0.5 + 1e-4
    assert result.series_instance_uid != source.series_instance_uid
    assert pydicom.dcmread(images[0]).ImageType[0] == "DERIVED"
    # the same call without the trailing slash, and a job seen while it runs
    status, slow = api("POST", "/job", {"job_name": "slowjob", "in_dir": str(jobs_root / "dicom_data")})
    assert status == 201
    status, running = api("GET", f"/query/{slow['uid']}")  # the slow task takes 4 s
    assert status == 202 and running["msg"] == "Job is running"
    assert wait_until(completed_of(api, slow["uid"]), deadline_s=60, what="slow job")["msg"] == "Job has completed"


def completed_of(api: Api, uid: str) -> Any:
    def check() -> dict[str, Any] | None:
        status, answer = api("GET", f"/query/{uid}")
        return dict(answer) if status != 202 else None
    return check


def test_job_server_refusals_say_why(node: tuple[NodeProcess, Api], tmp_path: Path) -> None:
    process, api = node
    jobs_root = process.data_dir / "jobs"
    head = WHOLE_HEAD / "12-T1post-05670"
    shutil.copytree(head, jobs_root / "head")
    (jobs_root / "escape").symlink_to(HIPPO_CROP_STUDY1, target_is_directory=True)
    (tmp_path / "outside").mkdir()
    cases = [
        ({"job_name": "3dblur", "in_dir": "../spool"}, "outside the jobs folder"),
        ({"job_name": "3dblur", "in_dir": "../../../../../../etc"}, "outside the jobs folder"),
        ({"job_name": "3dblur", "in_dir": str(tmp_path / "outside")}, "outside the jobs folder"),
        ({"job_name": "3dblur", "in_dir": "escape"}, "outside the jobs folder"),
        ({"job_name": "3dblur", "in_dir": "."}, "not the jobs folder itself"),
        ({"job_name": "3dblur", "in_dir": "no_such_folder"}, "is not a folder"),
        ({"job_name": "4dblur", "in_dir": "head"}, "unknown job '4dblur'"),
        ({"job_name": "3dblur"}, "in_dir: required"),
        ({"job_name": "3dblur", "in_dir": "head", "sigma": 3}, "sigma: unknown field"),
        (["3dblur", "head"], "expected a JSON object"),
    ]
    for request, message in cases:
        status, answer = api("POST", "/job/", request)
        assert status == 400 and message in answer["msg"], (request, answer)
    assert "job request refused: in_dir" in process.log_text()
    assert api("POST", "/job/", {"job_name": "3dblur", "in_dir": "head"}, token=None)[0] == 401
    status, answer = api("GET", "/query/no-such-uid")
    assert status == 404 and "no-such-uid" in answer["msg"]
    # a task's own name works too; a job with nothing to run on ends with a 4xx and the reason
    status, body = api("POST", "/job/", {"job_name": "hippocampus", "in_dir": "head"})
    assert status == 201
    status, answer = wait_until(lambda: (r := api("GET", f"/query/{body['uid']}"))[0] != 202 and r,
                                deadline_s=30, what="final")
    assert status == 422 and answer["msg"].startswith("Job has nothing to run on: no series matches"), answer
    logged = (process.work_dir / "debug.log").read_text(encoding="utf-8")
    assert "serving on" in logged and f"job {body['uid']} requested" in logged
