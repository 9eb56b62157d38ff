"""The first job after the node starts is about as fast as later ones: workers warm up before they are ready."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.local.node_process import NodeProcess
from deploy.local.orthanc_process import free_port, run_storescu, wait_until
from tests.conftest import HIPPO_DICOM

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timing]

CROP_SERIES = HIPPO_DICOM / "Study1" / "13_HCropVolume"
WARM_JOBS = 3
RATIO = 1.5
MARGIN_S = 0.3
"""Absolute slack on top of the ratio, for a busy 2-core machine; a cold start costs seconds."""


def copy_as_new_study(out: Path) -> Path:
    """Write the crop series again with new study, series and instance UIDs."""
    out.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for path in sorted(CROP_SERIES.glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(out / path.name)
    return out


def model_seconds(line: str) -> float:
    """load + infer + report of a job's canonical log line."""
    stages = dict(re.findall(r" (load|infer|report)=([0-9.]+)s", line))
    assert set(stages) == {"load", "infer", "report"}, line
    return sum(float(value) for value in stages.values())


def test_first_job_after_start_is_as_fast_as_a_warm_one(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", port=free_port(), destinations={},
                       config={"grouping": {"quiet_period_s": 0.3, "max_wait_s": 60.0}})
    try:
        node.start()
        assert "warmed up hippocampus on a synthetic MR series" in node.log_text()
        ready_at = node.log_text().index("serving on")
        assert node.log_text().index("warmed up hippocampus") < ready_at  # ready only after
        lines: list[str] = []
        for index in range(1 + WARM_JOBS):
            run_storescu([copy_as_new_study(tmp_path / f"study-{index}")], node.port, called_aet=node.ae_title)
            lines = wait_until(
                lambda: (found := re.findall(r"job \S+ analysis=hippocampus .*outcome=done[^\n]*",
                                             node.log_text())) and len(found) > index and found,
                deadline_s=120, what=f"job {index + 1}", poll_s=0.2,
            )
        first = model_seconds(lines[0])
        warm = statistics.median(model_seconds(line) for line in lines[1:])
        print(f"first job load+infer+report {first:.3f} s, warm median {warm:.3f} s, ratio {first / warm:.2f}")
        assert first <= RATIO * warm + MARGIN_S, lines
    finally:
        node.stop(timeout_s=30)
