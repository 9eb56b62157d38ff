"""Tests for the API's view of a ledger job (service/api.py job_view)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.service.api import job_view
from dicom_node.state.records import InstanceRecord, PlannedJob
from dicom_node.state.sqlite import SqliteLedger

SERIES = {"modality": "MR", "description": "", "sop_class_uid": "", "manufacturer": "", "rows": 1,
          "columns": 1, "orientation": None, "pixel_spacing": None, "slice_thickness": None,
          "number_of_frames": None}


def test_done_job_shows_its_quality_judgement(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    ledger.record_instance(InstanceRecord("1.2.9.1", "1.2.9", "1.2", "1.2.840.10008.5.1.4.1.1.4",
                                          "1.2.840.10008.1.2.1", "/x", 1, "ORTHANC", 1.0), SERIES)
    (uid,) = ledger.complete_study("1.2", 2.0, [PlannedJob("hippocampus", "1.2.9")])
    job = ledger.claim_next_job(3.0, ["hippocampus"])
    assert job is not None
    quality = {"low_confidence": True, "reasons": ["total volume 496 mm3 outside the training range"],
               "checks": {"total_volume_mm3": 496.0}, "derivation": "from the training pool"}
    ledger.finish_job(job.id, 4.0, state="done", summary={"quality": quality})
    record = ledger.job(uid)
    assert record is not None
    assert job_view(record)["outputs"]["quality"] == quality
