"""The local stack end to end in a real browser: results filed by the node are seen correctly in OHIF."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from deploy.local.demo import result_series
from deploy.local.ohif_proxy import DEFAULT_WEB_ROOT
from deploy.local.orthanc_process import run_storescu, wait_until
from deploy.local.stack import LocalStack
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = REPO / "tests" / "artifacts"
STUDY1 = HIPPO_DICOM / "Study1"
STUDY_DESCRIPTION = "MR RCBV SEQUENCE"  # (0008,1030) of every source series of Study1


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """Orthanc + node + OHIF proxy with Study1 stored and the node's SEG, SC and SR filed back."""
    if not (DEFAULT_WEB_ROOT / "index.html").is_file():
        pytest.fail("the OHIF bundle is missing: run scripts/fetch-ohif.sh (scripts/setup.sh --test does)")
    local = LocalStack(tmp_path_factory.mktemp("stack"), stable_age_s=1)
    local.start()
    try:
        run_storescu([STUDY1], local.orthanc.dicom_port, called_aet=local.orthanc.aet)
        study_uid = str(pydicom.dcmread(next((STUDY1 / "13_HCropVolume").glob("*.dcm"))).StudyInstanceUID)
        wait_until(lambda: len(result_series(local.orthanc, study_uid)) == 3, deadline_s=120,
                   what="SEG, SC and SR in Orthanc", poll_s=0.5)
        local.study_uid = study_uid  # type: ignore[attr-defined]
        yield local
    except BaseException:
        print(f"----- node log -----\n{local.node.log_text()[-6000:]}")
        local.orthanc.dump_log()
        raise
    finally:
        local.stop()
    # a clean stop: every process gone, nothing listening any more
    assert local.node.process is not None and local.node.process.poll() is not None
    assert local.orthanc.process is not None and local.orthanc.process.poll() is not None
    for port in (local.node.port, local.orthanc.dicom_port, local.orthanc.http_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_ohif_overlay_has_the_nodes_volume(stack: LocalStack, browser_result: dict[str, Any]) -> None:
    """OHIF's own statistics of the decoded anterior segment match the node's measurement."""
    job = next(j for j in stack.node.ledger().job_rows() if j.state == "done")
    volumes = {m["structure"] or m["name"]: m["value"] for m in job.summary["measurements"]}
    expected = next(v for k, v in volumes.items() if "anterior" in k.lower())
    match = re.search(r"Hippocampus anterior .*?Volume ([\d,.]+) mm", browser_result["seg_anterior_stats"])
    assert match, browser_result["seg_anterior_stats"][-2000:]
    shown = float(match.group(1).replace(",", ""))
    assert abs(shown - expected) <= 0.05 * expected, (shown, expected)


def _sr_locations(stack: LocalStack) -> dict[str, int]:
    """Tracking identifier -> Instance Number of the source image its planar ROI outlines."""
    sr_series = result_series(stack.orthanc, stack.study_uid)["SR"]  # type: ignore[attr-defined]
    (instance,) = [i["ID"] for i in stack.orthanc.instances(sr_series)]
    _, _, body = get(f"{stack.orthanc.base_url}/instances/{instance}/file")
    report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(body)), copy=False).content
    assert isinstance(report, hd.sr.MeasurementReport)
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber)
               for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in (STUDY1 / "13_HCropVolume").glob("*.dcm"))}
    locations = {}
    for group in report.get_planar_roi_measurement_groups():
        (image,) = group.roi.ContentSequence
        locations[group.tracking_identifier] = numbers[str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)]
    return locations


def test_ohif_shows_each_sr_measurement_on_its_image(stack: LocalStack, browser_result: dict[str, Any]) -> None:
    """Opening the SR, OHIF labels every volume with its structure, on the image the SR outlines."""
    job = next(j for j in stack.node.ledger().job_rows() if j.state == "done")
    measurements = job.summary["measurements"]
    assert len(measurements) == 3
    locations = _sr_locations(stack)
    shown = {}
    for step in browser_result["sr_steps"]:
        (label,) = step["labels"]  # one measurement at a time, each drawn
        shown[label] = int(re.search(r"\bI:(\d+) \(", step["viewport"]).group(1))  # type: ignore[union-attr]
        assert "HippoCrop" in step["viewport"]
    for measurement in measurements:
        tracked = measurement["structure"] or "whole series"
        label = f"{tracked[0].upper()}{tracked[1:]} volume: {measurement['value']:.2f} mm3"
        assert label in shown, (label, sorted(shown))
        assert shown[label] == locations[tracked], (label, shown[label], locations)
    assert (ARTIFACTS / "ohif_sr_1.png").stat().st_size > 10_000


def test_proxy_serves_the_viewer_with_client_routes_and_wasm(stack: LocalStack) -> None:
    status, headers, body = get(f"{stack.ohif_url}/viewer?StudyInstanceUIDs=1.2.3")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body.lower()
    wasm = next(DEFAULT_WEB_ROOT.glob("*.wasm")).name
    status, headers, _ = get(f"{stack.ohif_url}/{wasm}")
    assert headers["Content-Type"] == "application/wasm"
    _, _, config = get(f"{stack.ohif_url}/app-config.js")
    assert b"qidoRoot: '/dicom-web'" in config
    with pytest.raises(urllib.error.HTTPError) as error:
        get(stack.ohif_url + "/no-such-bundle.js")
    assert error.value.code == 404  # a missing asset is not answered with index.html
    error.value.close()
    _, _, body = get(stack.ohif_url + "/../../../../etc/passwd")
    assert b"root:" not in body  # never outside the web root


def test_proxy_splits_includefield_for_orthanc(stack: LocalStack) -> None:
    fields = "00080020,00081030,00100040"
    accept = {"Accept": "application/dicom+json"}
    _, _, proxied = get(f"{stack.ohif_url}/dicom-web/studies?includefield={fields}", accept)
    repeated = "&".join(f"includefield={f}" for f in fields.split(","))
    _, _, direct = get(f"{stack.orthanc.base_url}/dicom-web/studies?{repeated}", accept)
    assert json.loads(proxied) == json.loads(direct)
    assert json.loads(proxied)[0]["00081030"]["Value"] == [STUDY_DESCRIPTION]


def run_browser(stack: LocalStack) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None or not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.fail("node or playwright-core missing: run scripts/setup.sh --test")
    if not Path("/usr/bin/chromium").exists():
        pytest.fail("/usr/bin/chromium missing: run scripts/setup.sh (apt package chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("ohif_*.png"):
        old.unlink()
    started = time.monotonic()
    run = subprocess.run([node, "ohif.js", stack.ohif_url, stack.study_uid, str(ARTIFACTS)],  # type: ignore[attr-defined]
                         cwd=BROWSER_DIR, capture_output=True, text=True, timeout=240)
    print(f"browser run {time.monotonic() - started:.1f} s; screenshots in {ARTIFACTS}\n{run.stderr[-4000:]}")
    assert run.returncode == 0, run.stderr[-4000:]
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(result["timings_ms"]), f"segment statistics after {result.get('seg_stats_hovers')} re-hovers")
    return result


@pytest.fixture(scope="module")
def browser_result(stack: LocalStack) -> dict[str, Any]:
    return run_browser(stack)


def test_ohif_shows_the_study_and_loads_the_seg_over_the_crop_series(browser_result: dict[str, Any]) -> None:
    result = browser_result
    # The study list still shows the description after the node's results arrived (they copy it).
    (row,) = [r for r in result["study_list_rows"] if "PGBM-002" in r]
    assert STUDY_DESCRIPTION in row
    assert all(modality in row for modality in ("SEG", "SR", "MR"))
    # Every result series is listed beside the five source series.
    thumbnails = " | ".join(result["thumbnails"])
    for expected in ("SEG Hippocampus volumetry segmentation", "SR Hippocampus volumetry measurements",
                     "OT Hippocampus volumetry report", "MR HippoCrop"):
        assert expected in thumbnails
    # The SEG was hydrated over its source series, with both segments named.
    assert result["seg_prompted"] == "Do you want to open this Segmentation?"
    assert "HippoCrop" in result["seg_viewport"]
    panel = result["seg_panel"]
    assert "Hippocampus volumetry segmentation" in panel
    assert "Hippocampus anterior" in panel and "Hippocampus posterior" in panel
    assert "HippoCrop" in result["seg_anterior_viewport"]
    # The report with the volumes opens in the viewport.
    assert "Hippocampus volumetry report" in result["report_viewport"]
    assert not [e for e in result["errors"] if e.startswith("HTTP")], result["errors"]
    for name in ("study_list", "seg", "seg_anterior", "report"):
        assert (ARTIFACTS / f"ohif_{name}.png").stat().st_size > 10_000

