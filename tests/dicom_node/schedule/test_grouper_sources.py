"""A study from a configured source is complete as soon as the series its analyses need arrived."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import GroupingSettings
from dicom_node.errors import SourceUnavailable
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.state.records import InstanceRecord, JobState, SeriesInfo
from dicom_node.state.sqlite import SqliteLedger
from tests.conftest import FakeClock
from tests.dicom_node.schedule.test_grouper import MR, RULES, receive

HIPPO = SeriesInfo("1.2.3", "1.2", "MR", "HippoCrop", "1.2.840.10008.5.1.4.1.1.4", "", 51, 35,
                   (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 1.0), 1.0, None, 4)
OTHER = replace(HIPPO, series_uid="1.2.4", description="T1post", rows=512, columns=512, instance_count=6)


class Inventory:
    """What the source announces for study 1.2; counts the questions asked."""

    def __init__(self, *series: SeriesInfo, failure: str | None = None) -> None:
        self.series = list(series)
        self.failure = failure
        self.asked: list[tuple[str, str]] = []

    def __call__(self, source: str, study_uid: str) -> list[SeriesInfo]:
        self.asked.append((source, study_uid))
        if self.failure is not None:
            raise SourceUnavailable(source, self.failure)
        return self.series


def make_tracker(ledger: SqliteLedger, clock: FakeClock, inventory: Inventory) -> StudyTracker:
    return StudyTracker(ledger, GroupingSettings(quiet_period_s=5, max_wait_s=60), RULES, 20,
                        clock=clock, sources={"ORTHANC": "pacs"}, inventory=inventory)


def test_needed_series_complete_starts_the_job_while_other_series_arrive(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    inventory = Inventory(HIPPO, OTHER)
    grouper = make_tracker(ledger, clock, inventory)
    receive(ledger, clock, 2, series="1.2.4", description="T1post", rows=512, columns=512)
    receive(ledger, clock, 3)  # 3 of the 4 HippoCrop instances
    assert grouper.tick() == []
    receive(ledger, clock, 1, series="1.2.3.x")  # an instance of another, unannounced series
    assert grouper.tick() == []
    # the fourth HippoCrop instance: ready at once, no quiet period, T1post still arriving
    ledger.record_instance(*_instance("1.2.3", "1.2.3.4", clock()))
    (job_uid,) = grouper.tick()
    job = ledger.job(job_uid)
    assert job is not None and job.series_uid == "1.2.3" and job.state == JobState.QUEUED
    study = ledger.study("1.2")
    assert study is not None and study.state == "complete" and study.generation == 1
    assert inventory.asked == [("pacs", "1.2")]  # asked once per study

    # further instances belong to this generation until the study holds the 10 announced
    # (4 HippoCrop + 6 T1post; the study counts 7 so far, the unannounced one included)
    for i in range(3):
        ledger.record_instance(*_instance("1.2.4", f"1.2.4.{i + 3}", clock(), description="T1post"))
    study = ledger.study("1.2")
    assert study is not None and study.state == "complete" and study.generation == 1
    assert grouper.tick() == []
    # one more than announced is a late instance: a new generation, as without a source
    ledger.record_instance(*_instance("1.2.4", "1.2.4.99", clock(), description="T1post"))
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving" and study.generation == 2


def test_no_analysis_wants_the_study_completes_at_once_with_reasons(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = make_tracker(ledger, clock, Inventory(OTHER))
    receive(ledger, clock, 1, series="1.2.4", description="T1post", rows=512, columns=512)
    (job_uid,) = grouper.tick()
    job = ledger.job(job_uid)
    assert job is not None and job.state == JobState.NOT_APPLICABLE
    assert "T1post" in (job.reason or "") and "does not match" in (job.reason or "")


def test_source_that_does_not_answer_falls_back_to_quiet_period_and_says_why_once(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    inventory = Inventory(HIPPO, failure="GET /system: [Errno 111] Connection refused")
    grouper = make_tracker(ledger, clock, inventory)
    with caplog.at_level(logging.WARNING, logger="dicom_node.schedule.grouper"):
        receive(ledger, clock, 4)
        for _ in range(3):
            assert grouper.tick() == []
            clock.advance(1.0)
        clock.advance(2.0)
        assert len(grouper.tick()) == 1  # the quiet period of 5 s
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and len(inventory.asked) == 1
    assert "cannot ask source pacs" in warnings[0] and "Connection refused" in warnings[0]
    assert "grouping.quiet_period_s = 5 s" in warnings[0]


def test_studies_from_other_callers_are_not_asked(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    inventory = Inventory(HIPPO)
    grouper = StudyTracker(ledger, GroupingSettings(quiet_period_s=5, max_wait_s=60), RULES, 20,
                           clock=clock, sources={"OTHERPACS": "other"}, inventory=inventory)
    receive(ledger, clock, 4)  # sent by ORTHANC, which is not a source here
    assert grouper.tick() == []
    assert inventory.asked == []


def _instance(series: str, sop: str, at: float, **attrs: object) -> tuple[InstanceRecord, dict[str, Any]]:
    record = InstanceRecord(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            f"/s/{sop}", 10, "ORTHANC", at)
    return record, {**MR, **attrs}
