from __future__ import annotations

from pathlib import Path

from dicom_node.config import GroupingSettings
from dicom_node.schedule.grouper import DUE_CHECK_INTERVAL_S, StudyTracker
from dicom_node.state.records import InstanceRecord
from dicom_node.state.sqlite import SqliteLedger
from inference.base import SeriesRule
from tests.conftest import FakeClock

MR = {
    "modality": "MR", "description": "HippoCrop", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
    "manufacturer": "", "rows": 51, "columns": 35, "orientation": "[1,0,0,0,1,0]",
    "pixel_spacing": "[1,1]", "slice_thickness": 1.0, "number_of_frames": None,
}
RULES = {"hippocampus": SeriesRule(modalities=("MR",), description_pattern="hippo", min_slices=2)}


def receive(ledger: SqliteLedger, clock: FakeClock, n: int, series: str = "1.2.3", **attrs: object) -> None:
    for i in range(n):
        sop = f"{series}.{i + 1}"
        ledger.record_instance(
            InstanceRecord(sop, series, "1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                           f"/s/{sop}", 10, "ORTHANC", clock()),
            {**MR, **attrs},
        )
        clock.advance(0.1)


def tracker(ledger: SqliteLedger, clock: FakeClock, quiet: float = 5, max_wait: float = 60) -> StudyTracker:
    return StudyTracker(ledger, GroupingSettings(quiet_period_s=quiet, max_wait_s=max_wait), RULES, 20,
                        clock=clock)


def test_study_completes_after_quiet_period(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = tracker(ledger, clock)
    receive(ledger, clock, 3)
    assert grouper.tick() == []
    clock.advance(4.8)
    assert grouper.tick() == []
    clock.advance(0.2)
    assert len(grouper.tick()) == 1
    assert grouper.tick() == []


def test_ticks_in_quick_succession_ask_the_ledger_for_due_studies_once(tmp_path: Path, clock: FakeClock) -> None:
    # the loop ticks on every stored instance; the due studies are looked up at most every
    # DUE_CHECK_INTERVAL_S, so a study that became due just after a lookup waits that long
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = tracker(ledger, clock)
    receive(ledger, clock, 3)  # the last instance 0.1 s ago
    clock.advance(4.88)
    assert grouper.tick() == []  # quiet for 4.98 s
    clock.advance(0.6 * DUE_CHECK_INTERVAL_S)  # due now, but the last lookup was just made
    assert grouper.tick() == []
    clock.advance(0.6 * DUE_CHECK_INTERVAL_S)
    assert len(grouper.tick()) == 1


def test_max_wait_completes_a_study_that_keeps_receiving(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = tracker(ledger, clock, quiet=5, max_wait=10)
    for _ in range(40):
        receive(ledger, clock, 1, series=f"1.2.{_ + 10}")
        clock.advance(0.3)
        if grouper.tick():
            break
    assert clock() - 1_000_000.0 >= 10
    assert clock() - 1_000_000.0 < 11


def test_one_job_per_selected_series_and_not_applicable(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    rules = {**RULES, "other": SeriesRule(modalities=("CT",))}
    grouper = StudyTracker(ledger, GroupingSettings(quiet_period_s=1, max_wait_s=60), rules, 20,
                           clock=clock)
    receive(ledger, clock, 3, series="1.2.3")
    receive(ledger, clock, 3, series="1.2.4", description="T1post")
    clock.advance(2)
    grouper.tick()
    jobs = {(j.analysis, j.series_uid): j for j in ledger.job_rows()}
    assert jobs[("hippocampus", "1.2.3")].state == "queued"
    other = jobs[("other", None)]
    assert other.state == "not_applicable"
    assert "modality MR is not CT" in other.reason


def test_late_instance_triggers_new_analysis(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = tracker(ledger, clock)
    receive(ledger, clock, 3)
    clock.advance(6)
    assert len(grouper.tick()) == 1
    ledger.record_instance(
        InstanceRecord("1.2.3.99", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.4",
                       "1.2.840.10008.1.2.1", "/s/x", 10, "ORTHANC", clock()), MR)
    clock.advance(6)
    assert len(grouper.tick()) == 1
    generations = sorted(j.generation for j in ledger.job_rows())
    assert generations == [1, 2]
