"""The HTTP API of a real node process: jobs in, derived series out, errors naming fields, metrics."""

from __future__ import annotations

import json
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
        "api": {"enabled": True, "port": api_port, "token": TOKEN},
        "tasks": {"gaussian-blur": {"plugin": "inference.blur.task:GaussianBlurTask",
                                    "series_numbers": {"derived": 8801}},
                  "slow": {"plugin": "tests.integration.slow_plugin:SlowHippocampus",
                           "options": {"delay_s": 4.0}}},
    }
    process = NodeProcess(tmp_path_factory.mktemp("node"), port=free_port(),
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
