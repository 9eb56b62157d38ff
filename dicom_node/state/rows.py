"""Typed records from ledger rows: one conversion shared by the SQLite and PostgreSQL backends."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from dicom_node.state.records import JobRecord, JobState, Origin, SeriesInfo, StudyRecord, StudyState


class Row(Protocol):
    """A database row read by column name (``sqlite3.Row``, or a dict from psycopg)."""

    def __getitem__(self, key: str, /) -> Any: ...


def series_info(row: Row) -> SeriesInfo:
    """Return a series row (with its ``instance_count``) as a :class:`SeriesInfo`."""
    orientation = json.loads(row["orientation"]) if row["orientation"] else None
    spacing = json.loads(row["pixel_spacing"]) if row["pixel_spacing"] else None
    return SeriesInfo(
        series_uid=row["series_uid"],
        study_uid=row["study_uid"],
        modality=row["modality"],
        description=row["description"],
        sop_class_uid=row["sop_class_uid"],
        manufacturer=row["manufacturer"],
        rows=row["rows"],
        columns=row["columns"],
        orientation=tuple(orientation) if orientation else None,
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        slice_thickness=row["slice_thickness"],
        number_of_frames=row["number_of_frames"],
        instance_count=row["instance_count"],
        convolution_kernel=row["convolution_kernel"],
    )


#: Studies with their instance counts; both backends append their WHERE and ORDER BY.
STUDY_SELECT = (
    "SELECT st.*, (SELECT count(*) FROM instances i WHERE i.study_uid = st.study_uid)"
    " AS instance_count FROM studies st"
)


def study_record(row: Row) -> StudyRecord:
    """Return a row of :data:`STUDY_SELECT` as a :class:`StudyRecord`."""
    return StudyRecord(
        study_uid=row["study_uid"], state=StudyState(row["state"]), generation=row["generation"],
        first_received_at=row["first_received_at"], last_received_at=row["last_received_at"],
        completed_at=row["completed_at"], origin=Origin(row["origin"]), purged_at=row["purged_at"],
        instance_count=row["instance_count"],
    )


def job_record(row: Row, **changes: Any) -> JobRecord:
    """Return a jobs row as a :class:`JobRecord`, with ``changes`` applied to its fields."""
    fields: dict[str, Any] = {
        "id": row["id"], "uid": row["uid"], "study_uid": row["study_uid"], "analysis": row["analysis"],
        "series_uid": row["series_uid"], "generation": row["generation"], "origin": Origin(row["origin"]),
        "state": JobState(row["state"]), "reason": row["reason"], "attempts": row["attempts"],
        "created_at": row["created_at"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "result_dir": row["result_dir"],
        "cancel_requested": bool(row["cancel_requested"]), "options": json.loads(row["options"]),
        "timings": json.loads(row["timings"]), "summary": json.loads(row["summary"]),
    }
    fields.update(changes)
    return JobRecord(**fields)


def job_outcome(
    row: Row, state: JobState, reason: str | None, deliveries: Sequence[tuple[str, Sequence[str]]],
) -> tuple[JobState, str | None, Sequence[tuple[str, Sequence[str]]]]:
    """Return what a finishing job records, given its row (``cancel_requested``, ``generation``, ``current``).

    A job cancelled while it ran ends as cancelled; a done job whose study has moved on to a
    newer generation ends as superseded; neither queues its deliveries.
    """
    if row["cancel_requested"]:
        return JobState.CANCELLED, "cancelled while it ran; its results were discarded", ()
    if row["generation"] < row["current"] and state == JobState.DONE:
        return JobState.SUPERSEDED, "new instances arrived while it ran; a newer analysis replaces it", ()
    return state, reason, deliveries
