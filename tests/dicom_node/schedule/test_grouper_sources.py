"""A study from a configured source is complete as soon as the series its analyses need arrived."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dicom_node.config import GroupingSettings, SourceSettings
from dicom_node.errors import SourceUnavailable
from dicom_node.receive.source import OrthancSource
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.state.records import InstanceRecord, JobState, SeriesInfo
from dicom_node.state.sqlite import SqliteLedger
from inference.base import SeriesRule
from tests.conftest import FakeClock
from tests.dicom_node.schedule.test_grouper import MR, RULES, receive

T = TypeVar("T")

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


class InlineExecutor(Executor):
    """Asks the question on the calling thread, so a tick sees the answer at once and tests never wait."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except SourceUnavailable as exc:
            future.set_exception(exc)
        return future


def make_tracker(ledger: SqliteLedger, clock: FakeClock, inventory: Inventory,
                 rules: dict[str, SeriesRule] = RULES) -> StudyTracker:
    return StudyTracker(ledger, GroupingSettings(quiet_period_s=5, max_wait_s=60), rules, 20,
                        clock=clock, sources={"ORTHANC": "pacs"}, inventory=inventory,
                        executor=InlineExecutor())


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
                           clock=clock, sources={"OTHERPACS": "other"}, inventory=inventory,
                           executor=InlineExecutor())
    receive(ledger, clock, 4)  # sent by ORTHANC, which is not a source here
    assert grouper.tick() == []
    assert inventory.asked == []


def test_each_job_is_queued_when_its_own_series_arrived(tmp_path: Path, clock: FakeClock) -> None:
    # three analyses: one wants HippoCrop, one T1post, one every MR series (two jobs)
    rules = {**RULES, "t1": SeriesRule(modalities=("MR",), description_pattern="t1post", min_slices=2),
             "every_mr": SeriesRule(modalities=("MR",), min_slices=2)}
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = make_tracker(ledger, clock, Inventory(HIPPO, OTHER), rules)
    receive(ledger, clock, 2, series="1.2.4", description="T1post", rows=512, columns=512)
    receive(ledger, clock, 4)  # every HippoCrop instance; T1post has 2 of 6
    first = grouper.tick()
    assert sorted(_job(ledger, uid) for uid in first) == [("every_mr", "1.2.3"), ("hippocampus", "1.2.3")]
    study = ledger.study("1.2")
    assert study is not None and study.state == "receiving"  # T1post still arriving
    claimed = ledger.claim_next_job(clock(), tuple(rules))  # a worker may start it now
    assert claimed is not None and claimed.series_uid == "1.2.3"
    assert grouper.tick() == []  # not queued twice
    for i in range(3):
        ledger.record_instance(*_instance("1.2.4", f"1.2.4.{i + 3}", clock(), description="T1post"))
        assert grouper.tick() == []  # 5 of 6
    ledger.record_instance(*_instance("1.2.4", "1.2.4.9", clock(), description="T1post"))
    second = grouper.tick()
    assert sorted(_job(ledger, uid) for uid in second) == [("every_mr", "1.2.4"), ("t1", "1.2.4")]
    study = ledger.study("1.2")
    assert study is not None and study.state == "complete" and study.generation == 1
    jobs = ledger.job_rows(study_uid="1.2")
    assert len(jobs) == 4 and {j.generation for j in jobs} == {1}


class StuckPeer:
    """A TCP peer that accepts connections and never answers: an Orthanc that hangs."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.server.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def stuck_peer() -> Iterator[StuckPeer]:
    peer = StuckPeer()
    yield peer
    peer.close()


def test_a_source_that_hangs_does_not_hold_up_other_studies(
    tmp_path: Path, clock: FakeClock, stuck_peer: StuckPeer, caplog: pytest.LogCaptureFixture
) -> None:
    timeout_s = 1.5
    source = OrthancSource("pacs", SourceSettings(ae_title="ORTHANC", url=f"http://127.0.0.1:{stuck_peer.port}",
                                                  timeout_s=timeout_s))
    answered = threading.Event()
    ledger = SqliteLedger(tmp_path / "l.sqlite3")
    grouper = StudyTracker(ledger, GroupingSettings(quiet_period_s=5, max_wait_s=60), RULES, 20,
                           clock=clock, sources={"ORTHANC": "pacs"},
                           inventory=lambda _, uid: source.routed_series(uid), on_answer=answered.set)
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node.schedule.grouper"):
            for i in range(4):  # a study from a modality, not from the source
                ledger.record_instance(*_instance("2.3", f"2.3.{i}", clock(), study="2", caller="MODALITY"))
            clock.advance(3.0)
            receive(ledger, clock, 4)  # study 1.2 from the source, which hangs
            started = time.monotonic()
            assert grouper.tick() == []
            clock.advance(2.5)  # study 2's quiet period has passed, not study 1.2's
            (job_uid,) = grouper.tick()
            elapsed_s = time.monotonic() - started
            assert _job(ledger, job_uid) == ("hippocampus", "2.3")
            assert elapsed_s < timeout_s / 2, elapsed_s  # neither tick waited for the source
            assert not answered.is_set()  # the question is still in flight
            # the source's timeout: the study falls back to the quiet period, and the log says why
            assert answered.wait(timeout_s * 10)
            assert stuck_peer.accepted  # the question did reach the peer
            assert grouper.tick() == []
            clock.advance(2.6)
            (job_uid,) = grouper.tick()
            assert _job(ledger, job_uid) == ("hippocampus", "1.2.3")
        why = [r.getMessage() for r in caplog.records if "cannot ask source pacs" in r.getMessage()]
        assert len(why) == 1 and why[0].startswith("study 1.2: ") and "timed out" in why[0].lower(), why
    finally:
        grouper.close()
        source.close()


def _job(ledger: SqliteLedger, uid: str) -> tuple[str, str | None]:
    job = ledger.job(uid)
    assert job is not None and job.state == JobState.QUEUED
    return job.analysis, job.series_uid


def _instance(series: str, sop: str, at: float, *, study: str = "1.2", caller: str = "ORTHANC",
              **attrs: object) -> tuple[InstanceRecord, dict[str, Any]]:
    record = InstanceRecord(sop, series, study, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                            f"/s/{sop}", 10, caller, at)
    return record, {**MR, **attrs}
