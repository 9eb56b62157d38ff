"""The ``analyze`` and ``batch`` commands, as a researcher runs them through ``dicom-node``."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.cli.main import main
from tests.conftest import HIPPO_DICOM

pytestmark = pytest.mark.slow


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
