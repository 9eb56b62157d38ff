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


def test_convert_takes_the_processing_pipeline_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    crop = HIPPO_DICOM / "Study1" / "13_HCropVolume"
    h5, header, out = tmp_path / "vol.h5", tmp_path / "vol.json", tmp_path / "out"
    # dicom_to_hd5.py -i DICOM_DIR -h OUT.h5 -j OUT.json
    assert main(["convert", "to-hdf5", "-i", str(crop), "-h", str(h5), "-j", str(header)]) == 0
    assert h5.is_file() and json.loads(header.read_text())["series"]["Modality"] == "MR"
    # hd5_to_dicom.py -h IN.h5 -d TEMPLATE.dcm -o OUT_DIR, with one template file
    template = sorted(crop.glob("*.dcm"))[0]
    assert main(["convert", "to-dicom", "-h", str(h5), "-d", str(template), "-o", str(out)]) == 0
    assert "wrote 32 image(s)" in capsys.readouterr().out
    assert len(list(out.glob("*.dcm"))) == 32
    # positional arguments as before
    assert main(["convert", "to-dicom", str(h5), str(crop), str(tmp_path / "out2")]) == 0
    assert len(list((tmp_path / "out2").glob("*.dcm"))) == 32
    with pytest.raises(SystemExit) as shown:
        main(["convert", "to-hdf5", "--help"])
    assert shown.value.code == 0 and "-h HDF5, --hdf5 HDF5" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["convert", "to-hdf5", "-i", str(crop), "-j", str(header)])
    assert refused.value.code == 2 and "give OUT_H5 or -h/--hdf5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "to-hdf5", str(crop), str(h5), str(header), "-i", str(tmp_path)])
    assert "DICOM_DIR and -i/--input-dicom name the same input" in capsys.readouterr().err
