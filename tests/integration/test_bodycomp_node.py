"""Body composition in the node: a CT study routed by Orthanc comes back with SEG, SC and SR at L3, as fast as a warm job."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import OrthancProcess, free_port, run_storescu, wait_until
from tests.conftest import SHARED_DATA, sr_content_items
from tests.factories import series_from_nifti, write_datasets

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]

#: The first job after start-up may take this much longer than the next (issue 12: at most 1.5x),
#: plus an absolute slack for a busy 2-core machine; without a warm-up it pays ~0.9 s of imports,
#: plotting and report set-up on this CT (measured 2.1 s against 1.25 s).
RATIO = 1.5
MARGIN_S = 0.3


def model_seconds(timings: dict[str, float]) -> float:
    """load + infer + report of a job's timings."""
    return sum(timings[stage] for stage in ("load", "infer", "report"))


def test_ct_study_gets_body_composition_results(
    tmp_path: Path, make_orthanc: Callable[..., OrthancProcess]
) -> None:
    series = series_from_nifti(SHARED_DATA / "ct-abdomen" / "example_ct.nii.gz", modality="CT",
                               orientation="axial", series_description="Abdomen 3mm", seed=7)
    paths = write_datasets(series, tmp_path / "ct")
    study_uid = str(series[0].StudyInstanceUID)
    node_port = free_port()
    orthanc = make_orthanc(node_aet="DICOMNODE", node_host="127.0.0.1", node_port=node_port)
    node = NodeProcess(
        tmp_path / "node", port=node_port,
        destinations={"pacs": (orthanc.aet, "127.0.0.1", orthanc.dicom_port)},
        config={"analyses": {
            "hippocampus": {"plugin": "hippocampus"},
            "body-composition": {"plugin": "body-composition",
                                 "series_numbers": {"seg": 9911, "sc": 9912, "sr": 9913}},
        }},
    )
    try:
        node.start()
        assert "warmed up body-composition on a synthetic CT series" in node.log_text()
        run_storescu(paths, orthanc.dicom_port, called_aet=orthanc.aet)

        def results() -> dict[int, str] | None:
            found = {}
            for match in orthanc.lookup(study_uid):
                if match.get("Type") == "Study":
                    for item in orthanc.series(match["ID"]):
                        number = int(item["MainDicomTags"].get("SeriesNumber", 0) or 0)
                        if number in (9911, 9912, 9913):
                            found[number] = item["Instances"][0]
            return found if len(found) == 3 else None

        found = wait_until(results, deadline_s=180, what="body composition results in Orthanc", poll_s=0.5)
        jobs = {j.analysis: j for j in node.ledger().job_rows()}
        assert jobs["hippocampus"].state == "not_applicable"
        assert "modality CT is not MR" in jobs["hippocampus"].reason
        summary = jobs["body-composition"].summary
        assert summary["method"].startswith("classical HU thresholds")
        assert "psoas measured beside a vertebral body, not at a disc level" in summary["method"]
        areas = {m["structure"]: m["value"] for m in summary["measurements"] if m["unit"] == "cm2"}
        assert set(areas) == {"Skeletal muscle", "Subcutaneous fat", "Visceral fat"}
        # the classical path on this CT at L3 (README): muscle ~141 (psoas included), fat ~206 and ~136 cm2
        # (visceral fat without intermuscular fat and gas-mixed bowel contents)
        assert areas["Skeletal muscle"] == pytest.approx(140.7, rel=0.05)  # 121.1 without the psoas
        assert areas["Subcutaneous fat"] == pytest.approx(205.9, rel=0.1)
        assert areas["Visceral fat"] == pytest.approx(136.3, rel=0.1)
        seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(
            orthanc.request("GET", f"/instances/{found[9911]}/file"))))
        assert seg.StudyInstanceUID == study_uid
        assert seg.StudyDescription == series[0].StudyDescription
        assert [s.SegmentLabel for s in seg.SegmentSequence] == [
            "Skeletal muscle", "Subcutaneous fat", "Visceral fat"]
        sr = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{found[9913]}/file")))
        units = {item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
                 for item in sr_content_items(sr.ContentSequence) if item.get("ValueType") == "NUM"}
        assert units == {"cm2", "[hnsf'U]"}

        # a second study of the same CT, sent straight to the node: the first job was no slower
        again = series_from_nifti(SHARED_DATA / "ct-abdomen" / "example_ct.nii.gz", modality="CT",
                                  orientation="axial", series_description="Abdomen 3mm", seed=8)
        run_storescu(write_datasets(again, tmp_path / "ct-again"), node.port, called_aet=node.ae_title)
        second = wait_until(
            lambda: next((j for j in node.ledger().job_rows(study_uid=str(again[0].StudyInstanceUID))
                          if j.analysis == "body-composition" and j.state == "done"), None),
            deadline_s=120, what="the second body composition job")
        first_s, warm_s = model_seconds(jobs["body-composition"].timings), model_seconds(second.timings)
        print(f"body composition load+infer+report: first {first_s:.3f} s, second {warm_s:.3f} s")
        assert first_s <= RATIO * warm_s + MARGIN_S, (jobs["body-composition"].timings, second.timings)
    finally:
        node.stop()

