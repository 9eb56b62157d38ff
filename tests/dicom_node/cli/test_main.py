"""The dicom-node command line, as an admin and a researcher use it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli.main import main
from dicom_node.state.ledger import InstanceRecord, Ledger, PlannedJob
from tests.conftest import HIPPO_DICOM, REPO

pytestmark = pytest.mark.slow


def test_check_config_prints_the_effective_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(REPO / "deploy" / "node.toml"), "--port", "11113",
                 "--destination", "ARCHIVE@archive:104"]) == 0
    out = capsys.readouterr().out
    assert "port = 11113" in out
    assert '[destinations.archive]\nae_title = "ARCHIVE"\nhost = "archive"\nport = 104' in out


def test_check_config_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text("[workers]\ndevice = 'gpu'\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.toml: workers.device: device 'gpu' is not one of" in err


def test_analyze_one_study_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(HIPPO_DICOM / "Study1"), "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    (job,) = summary["jobs"]
    assert job["state"] == "done" and job["analysis"] == "hippocampus"
    folder = tmp_path / "hippocampus" / job["series_instance_uid"]
    assert {p.name for p in folder.iterdir()} >= {"seg.dcm", "sc.dcm", "sr.dcm", "result.json"}
    names = [m["name"] for m in job["measurements"]]
    assert names == ["Hippocampus anterior volume", "Hippocampus posterior volume", "Total hippocampus volume"]


def broken_copy(folder: Path) -> Path:
    folder.mkdir(parents=True)
    series = generate_uid()
    for source in sorted((HIPPO_DICOM / "Study2" / "14_HCropVolume").glob("*.dcm")):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = ds.PixelData[:100]
        ds.save_as(folder / source.name)
    return folder


def test_batch_reports_every_study_and_fails_if_one_failed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    studies = [HIPPO_DICOM / "Study1", HIPPO_DICOM / "Study2", broken_copy(tmp_path / "broken"), empty]
    assert main(["batch", *map(str, studies), "--out", str(tmp_path / "out"), "--workers", "2"]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["studies"], summary["succeeded"], summary["failed"]) == (4, 2, 2)
    by_study = {Path(r["study"]).name: r for r in summary["results"]}
    assert by_study["broken"]["jobs"][0]["state"] == "failed"
    assert "could not be decoded" in by_study["broken"]["jobs"][0]["reason"]
    assert by_study["empty"]["error"] == "no DICOM images found"
    assert "2 of 4 studies succeeded" in capsys.readouterr().out


def test_status_shows_failures_and_retry_requeues(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(InstanceRecord("1.2.3.1", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4",
                                          "1.2.840.10008.1.2.1", "/x", 1, "ORTHANC", 1.0),
                           {"modality": "MR", "description": "", "sop_class_uid": "", "manufacturer": "",
                            "rows": 1, "columns": 1, "orientation": None, "pixel_spacing": None,
                            "slice_thickness": None, "number_of_frames": None})
    (uid,) = ledger.complete_study("1.2", 2.0, [PlannedJob("hippocampus", "1.2.3")])
    job = ledger.claim_next_job(3.0, ["hippocampus"])
    assert job is not None
    ledger.finish_job(job["id"], 4.0, state="done", deliveries=[("pacs", ["/r/seg.dcm"])],
                      summary={"measurements": [{"name": "v", "structure": "Hippocampus anterior",
                                                 "value": 1234.5, "unit": "mm3"}]})
    (delivery,) = ledger.due_deliveries(4.0)
    ledger.delivery_failed(delivery["id"], 5.0, "cannot connect to ORTHANC@pacs:4242", retry_at=None)
    assert main(["status", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "deliveries pacs:dead" in out
    assert "Hippocampus anterior 1234.5 mm3" in out
    assert "pacs: dead after 1 attempt(s): cannot connect to ORTHANC@pacs:4242" in out
    assert main(["status", "--data-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["deliveries"] == {"dead": 1}
    assert main(["retry", "--data-dir", str(tmp_path)]) == 0
    assert "1 dead-lettered delivery(ies) re-queued" in capsys.readouterr().out
    assert Ledger(tmp_path / "ledger.sqlite3").counts()["deliveries"] == {"pending": 1}
    assert uid


def test_status_without_a_ledger_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "no ledger at" in capsys.readouterr().err
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_train_hippocampus_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from tests.conftest import SHARED_DATA

    out = tmp_path / "w.pt"
    assert main(["train", "hippocampus", "--data", str(SHARED_DATA / "hippocampus-msd"), "--out", str(out),
                 "--epochs", "1", "--max-cases", "6", "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed
    meta = torch.load(out, map_location="cpu", weights_only=True)["meta"]
    assert meta["epochs"] == 1 and meta["axcodes"] == ("R", "A", "S")
    assert "CC-BY-SA 4.0" in meta["attribution"]
