"""Typed state: the states of studies, jobs and deliveries, and the records the ledger hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class StudyState(StrEnum):
    """Where a study is: instances still arriving, or complete (its jobs were created)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    """A job's life: queued -> running -> done | failed; or not applicable, superseded, cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the job will not run again unless someone retries it."""
        return self not in (JobState.QUEUED, JobState.RUNNING)


class DeliveryState(StrEnum):
    """A delivery of a job's results to one destination."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"
    SUPERSEDED = "superseded"


class Origin(StrEnum):
    """How a study's instances, or a job's request, reached the node."""

    DICOM = "dicom"
    WATCH = "watch"
    API = "api"


#: The stages of a job, in order, as in its log line and the metrics.
STAGES = ("receive", "wait", "queue", "load", "infer", "report", "send")


@dataclass(frozen=True)
class SeriesInfo:
    """What selection rules may look at: one series' identifying and geometric attributes."""

    series_uid: str
    study_uid: str
    modality: str
    description: str
    sop_class_uid: str
    manufacturer: str
    rows: int | None
    columns: int | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    number_of_frames: int | None
    instance_count: int
    convolution_kernel: str = ""


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as recorded before it was acknowledged."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    calling_ae_title: str
    received_at: float
    origin: Origin = Origin.DICOM
    #: SHA-256 of the stored file (hex): the manifest a worker on another host checks against.
    sha256: str = ""


@dataclass(frozen=True)
class ManifestEntry:
    """One instance of a series as recorded at receive time: what a remote worker verifies."""

    sop_instance_uid: str
    path: str
    size_bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        """Return the entry without its local path (it means nothing on another host)."""
        return {"sop_instance_uid": self.sop_instance_uid, "size_bytes": self.size_bytes,
                "sha256": self.sha256}


@dataclass(frozen=True)
class PlannedJob:
    """A job to create when a study completes (``state`` queued or not_applicable)."""

    analysis: str
    series_uid: str | None
    state: JobState = JobState.QUEUED
    reason: str | None = None


@dataclass(frozen=True)
class StudyRecord:
    """One study: its state, generation and when its instances arrived."""

    study_uid: str
    state: StudyState
    generation: int
    first_received_at: float
    last_received_at: float
    completed_at: float | None
    origin: Origin
    purged_at: float | None
    instance_count: int

    def to_json(self) -> dict[str, Any]:
        """Return the study as plain JSON types (status views, the API)."""
        return {
            "study_uid": self.study_uid, "state": str(self.state), "generation": self.generation,
            "first_received_at": self.first_received_at, "last_received_at": self.last_received_at,
            "completed_at": self.completed_at, "origin": str(self.origin), "purged_at": self.purged_at,
            "instance_count": self.instance_count,
        }


@dataclass(frozen=True)
class DeliveryRecord:
    """Where one job's results stand with one destination."""

    destination: str
    state: DeliveryState
    attempts: int
    last_error: str | None
    sent_at: float | None
    next_attempt_at: float

    def to_json(self) -> dict[str, Any]:
        """Return the delivery as plain JSON types."""
        return {"destination": self.destination, "state": str(self.state), "attempts": self.attempts,
                "last_error": self.last_error, "sent_at": self.sent_at,
                "next_attempt_at": self.next_attempt_at}


@dataclass(frozen=True)
class DueDelivery:
    """A pending delivery whose next attempt is due: what to send, where, for which job."""

    id: int
    job_uid: str
    study_uid: str
    destination: str
    files: tuple[str, ...]
    attempts: int


@dataclass(frozen=True)
class JobRecord:
    """One job: an analysis of one series of one study generation, and what became of it."""

    id: int
    uid: str
    study_uid: str
    analysis: str
    series_uid: str | None
    generation: int
    origin: Origin
    state: JobState
    reason: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_dir: str | None
    cancel_requested: bool
    options: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    deliveries: tuple[DeliveryRecord, ...] = ()

    def stage_timings(self, study: StudyRecord | None) -> dict[str, float]:
        """Return the job's stage timings, with receive, wait and queue derived from the ledger.

        ``wait`` is never negative: a study completed by a request may be marked complete
        before its last instance's timestamp.
        """
        timings = {k: float(v) for k, v in self.timings.items()}
        if study is not None:
            timings.setdefault("receive", study.last_received_at - study.first_received_at)
            if study.completed_at:
                timings.setdefault("wait", max(0.0, study.completed_at - study.last_received_at))
        if self.started_at:
            timings.setdefault("queue", self.started_at - self.created_at)
        return timings

    def log_line(self, study: StudyRecord | None, outcome: str) -> str:
        """Return the one canonical log line of a finished job: ids, stage timings, outcome."""
        timings = self.stage_timings(study)
        parts = " ".join(f"{k}={timings[k]:.3f}s" for k in STAGES if k in timings)
        return (
            f"job {self.uid} analysis={self.analysis} study={self.study_uid}"
            f" series={self.series_uid} {parts} outcome={outcome}"
        )

    def to_json(self) -> dict[str, Any]:
        """Return the job as plain JSON types (``status --json``)."""
        return {
            "id": self.id, "uid": self.uid, "study_uid": self.study_uid, "analysis": self.analysis,
            "series_uid": self.series_uid, "generation": self.generation, "origin": str(self.origin),
            "state": str(self.state), "reason": self.reason, "attempts": self.attempts,
            "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "timings": dict(self.timings),
            "result_dir": self.result_dir, "summary": dict(self.summary),
            "options": dict(self.options), "cancel_requested": int(self.cancel_requested),
            "deliveries": [d.to_json() for d in self.deliveries],
        }


@dataclass(frozen=True)
class LedgerCounts:
    """How many studies, jobs and deliveries are in each state, and how many instances are held.

    ``low_confidence`` counts the jobs whose result its analysis flagged as low confidence.
    """

    studies: dict[str, int]
    jobs: dict[str, int]
    deliveries: dict[str, int]
    instances: int
    low_confidence: int = 0

    def to_json(self) -> dict[str, dict[str, int]]:
        """Return the counts as in ``status --json``."""
        return {"jobs": dict(self.jobs), "deliveries": dict(self.deliveries),
                "studies": dict(self.studies), "instances": {"received": self.instances},
                "results": {"low_confidence": self.low_confidence}}
