"""The status page of a real node in headless Chromium: studies, timings, failures, a working retry button."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import free_port, wait_until
from tests.conftest import HIPPO_CROP_STUDY1, REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BROWSER_DIR = Path(__file__).parent / "browser"
SCREENSHOT = REPO / "tests" / "artifacts" / "status_page.png"
TOKEN = "page-token"


def call(port: int, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[NodeProcess, int]]:
    port = free_port()
    process = NodeProcess(tmp_path / "node", port=free_port(), destinations={},
                          config={"api": {"enabled": True, "port": port, "token": TOKEN}})
    process.start()
    yield process, port
    process.stop()
    print(process.log_text()[-4000:])


def test_status_page_shows_failures_and_retries_in_a_real_browser(tmp_path: Path, node: tuple[NodeProcess, int]) -> None:
    if shutil.which("node") is None or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("run `npm install` in tests/integration/browser (scripts/setup.sh does)")
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("/usr/bin/chromium is missing: apt package chromium")
    _, port = node
    good = call(port, "POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(HIPPO_CROP_STUDY1)},
                                        "options": {"sigma_mm": 1.5}})
    gapped = tmp_path / "gapped"  # a copy of the series, one slice missing: the job fails with the reason
    gapped.mkdir()
    study, series = generate_uid(), generate_uid()
    for path in sorted(HIPPO_CROP_STUDY1.glob("*.dcm"), key=lambda p: int(p.stem)):
        if path.stem != "16":
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(gapped / path.name)
    bad = call(port, "POST", "/jobs", {"task": "gaussian-blur", "input": {"dir": str(gapped)}})
    failed = wait_until(lambda: (j := call(port, "GET", f"/jobs/{bad['uid']}"))["status"] == "failed" and j,
                        deadline_s=60, what="failed job")
    wait_until(lambda: call(port, "GET", f"/jobs/{good['uid']}")["status"] == "done", deadline_s=60, what="done")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        ["node", "check_status.mjs", f"http://127.0.0.1:{port}/", TOKEN, bad["uid"], str(SCREENSHOT)],
        cwd=BROWSER_DIR, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    page = json.loads(completed.stdout.strip().splitlines()[-1])
    assert page["page_errors"] == []
    assert "dicom-node" in page["title"] and page["job_rows"] == 2 and page["study_rows"] >= 1
    assert failed["reason"].split(":")[-1].strip()[:30] in page["failure_text"]
    assert any("infer" in text and "report" in text for text in page["timing_text"])
    assert "token" in page["toast_without_token"] and "queued again" in page["toast_with_token"]
    again = wait_until(lambda: (j := call(port, "GET", f"/jobs/{bad['uid']}"))["finished_at"] != failed["finished_at"]
                       and j["status"] == "failed" and j, deadline_s=30, what="retried job failed again")
    assert again["reason"] == failed["reason"]
    assert SCREENSHOT.stat().st_size > 10_000
