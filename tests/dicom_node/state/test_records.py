"""Typed records: a job's stage timings and its one log line, derived once for the log and the metrics."""

from __future__ import annotations

from dicom_node.state.records import JobRecord, JobState, Origin, StudyRecord, StudyState


def _job(**changes: object) -> JobRecord:
    fields: dict[str, object] = dict(
        id=1, uid="j-1", study_uid="1.2", analysis="a", series_uid="1.2.3", generation=1,
        origin=Origin.DICOM, state=JobState.DONE, reason=None, attempts=1, created_at=100.0,
        started_at=100.5, finished_at=102.0, result_dir=None, cancel_requested=False,
        timings={"load": 0.1, "infer": 0.5, "report": 0.2},
    )
    fields.update(changes)
    return JobRecord(**fields)  # type: ignore[arg-type]


def _study(**changes: object) -> StudyRecord:
    fields: dict[str, object] = dict(
        study_uid="1.2", state=StudyState.COMPLETE, generation=1, first_received_at=90.0,
        last_received_at=95.0, completed_at=99.0, origin=Origin.DICOM, purged_at=None, instance_count=3,
    )
    fields.update(changes)
    return StudyRecord(**fields)  # type: ignore[arg-type]


def test_stage_timings_derive_receive_wait_and_queue_from_the_ledger() -> None:
    timings = _job().stage_timings(_study())
    assert timings == {"load": 0.1, "infer": 0.5, "report": 0.2, "receive": 5.0, "wait": 4.0, "queue": 0.5}


def test_wait_is_never_negative() -> None:
    # a study completed by a request before its last instance's timestamp
    assert _job().stage_timings(_study(completed_at=94.0))["wait"] == 0.0


def test_log_line_lists_the_stages_in_order_with_the_outcome() -> None:
    line = _job().log_line(_study(), "sent to pacs")
    assert line == ("job j-1 analysis=a study=1.2 series=1.2.3 receive=5.000s wait=4.000s queue=0.500s"
                    " load=0.100s infer=0.500s report=0.200s outcome=sent to pacs")


def test_final_states() -> None:
    assert {s for s in JobState if s.is_final} == {
        JobState.DONE, JobState.FAILED, JobState.NOT_APPLICABLE, JobState.SUPERSEDED, JobState.CANCELLED}
