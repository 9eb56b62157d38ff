"""The job service: requested jobs, retries and cancellations, and the views of jobs and studies."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import InvalidJobRequest
from dicom_node.receive.ingest import Ingestor
from dicom_node.schedule.selection import select_series
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import JobRecord, JobState, LedgerCounts, Origin, PlannedJob, StudyRecord
from inference.base import Analysis, ConfigurableAnalysis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryOutcome:
    """What a retry did: whether the job was queued again, and how many dead deliveries were."""

    requeued: bool
    redelivered: int


def retry_job(ledger: Ledger, job_uid: str, now: float) -> RetryOutcome:
    """Queue a final job again and move its dead-lettered deliveries back to pending.

    Only a job that is queued again has its deliveries re-queued: the results of a job that
    is running, queued or superseded are not sent again. Its results keep their UIDs, so
    the PACS gets them in place of the earlier ones.
    """
    if not ledger.retry_job(job_uid):
        return RetryOutcome(False, 0)
    return RetryOutcome(True, ledger.redeliver(now, job_uid))


class JobService:
    """Jobs as the API sees them: create on request, retry, cancel, list.

    Parameters
    ----------
    ledger
        The node's state.
    runnable
        Every analysis and task a request may name, loaded (their rules and options).
    default_min_slices
        Selection's default minimum number of slices.
    ingestor
        Stores a requested folder's files like C-STORE instances.
    clock
        Wall-clock time source (injected in tests).
    wake
        Makes the scheduler look at the ledger now.
    """

    def __init__(
        self,
        ledger: Ledger,
        runnable: Mapping[str, Analysis],
        default_min_slices: int,
        ingestor: Ingestor,
        *,
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.ledger = ledger
        self.runnable = dict(runnable)
        self.default_min_slices = default_min_slices
        self.ingestor = ingestor
        self.clock = clock
        self.wake = wake

    @property
    def task_names(self) -> list[str]:
        """Return the names a request may give as its task, sorted."""
        return sorted(self.runnable)

    def submit(
        self, task: str, *, input_dir: Path | None = None, study_uid: str | None = None,
        series_uid: str | None = None, options: dict[str, Any] | None = None,
    ) -> str:
        """Create a job for one task, like a completed study's jobs; return its uid.

        With ``input_dir`` its files are first ingested exactly like C-STORE instances and
        their study is marked complete (the request says what runs on it), and only the series
        of that folder are candidates, even when the node holds older series of the same
        study; with ``study_uid`` the study must already be in the ledger. The task's rule
        selects the series (the first it accepts, or ``series_uid``); none gives a
        ``not_applicable`` job with reasons.

        Raises
        ------
        InvalidJobRequest
            Naming the field: unknown task, bad options, no usable input.
        """
        analysis = self.runnable.get(task)
        if analysis is None:
            raise InvalidJobRequest("task", f"unknown task {task!r} (known: {', '.join(self.task_names)})")
        chosen: dict[str, Any] = {}
        if options:
            if not isinstance(analysis, ConfigurableAnalysis):
                raise InvalidJobRequest("options", f"{task} takes no options")
            try:
                chosen = analysis.validate_options(dict(options))
            except ValueError as exc:
                name, _, reason = str(exc).partition(": ")
                raise InvalidJobRequest(f"options.{name}", reason or str(exc)) from None
        folder_series: set[str] | None = None
        if input_dir is not None:
            study_uid, folder_series = self._ingest_dir(input_dir)
        if study_uid is None or self.ledger.study(study_uid) is None:
            raise InvalidJobRequest("input.study_instance_uid", f"study {study_uid} was not received by this node")
        series = self.ledger.series_of_study(study_uid)
        if folder_series is not None:
            # a folder job runs on the series in that folder, not on others the study already had
            series = [s for s in series if s.series_uid in folder_series]
        if series_uid is not None:
            series = [s for s in series if s.series_uid == series_uid]
            if not series:
                raise InvalidJobRequest("input.series_instance_uid", f"{series_uid} is not a series of the study")
        selection = select_series(series, analysis.rule, self.default_min_slices)
        planned = (PlannedJob(task, selection.selected[0].series_uid) if selection.selected else
                   PlannedJob(task, None, JobState.NOT_APPLICABLE, f"no series matches: {selection.explain()}"))
        uid = self.ledger.create_job(study_uid, planned, self.clock(), origin=Origin.API, options=chosen,
                                     complete=input_dir is not None)
        logger.info("job %s requested: task=%s study=%s series=%s state=%s", uid, task, study_uid,
                    planned.series_uid, planned.state)
        self.wake()
        return uid

    def _ingest_dir(self, input_dir: Path) -> tuple[str, set[str]]:
        if not input_dir.is_absolute() or not input_dir.is_dir():
            raise InvalidJobRequest("input.dir", f"{input_dir} is not an absolute path to a folder on the node")
        report = self.ingestor.ingest_tree(input_dir, origin=Origin.API)
        if not report.stored:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in report.rejected[:3]) or "the folder is empty"
            raise InvalidJobRequest("input.dir", f"no DICOM instance could be stored ({reasons})")
        studies = report.study_uids
        if len(studies) > 1:
            raise InvalidJobRequest("input.dir", f"the folder holds {len(studies)} studies; send one study per job")
        return studies[0], {r.series_uid for r in report.stored}

    def retry(self, job_uid: str) -> RetryOutcome:
        """Queue a final job again (see :func:`retry_job`) and wake the scheduler."""
        outcome = retry_job(self.ledger, job_uid, self.clock())
        if outcome.requeued:
            self.wake()
        return outcome

    def cancel(self, job_uid: str) -> JobState | None:
        """Cancel a job: a queued one at once, a running one when it ends; return its state."""
        return self.ledger.cancel_job(job_uid, self.clock())

    def job(self, job_uid: str) -> JobRecord | None:
        """Return one job, or ``None``."""
        return self.ledger.job(job_uid)

    def jobs(
        self, *, state: str | None = None, task: str | None = None, study_uid: str | None = None,
        origin: str | None = None, limit: int = 100,
    ) -> list[JobRecord]:
        """Return recent jobs, newest first, optionally filtered."""
        return self.ledger.job_rows(state=state, analysis=task, study_uid=study_uid, origin=origin, limit=limit)

    def studies(self, limit: int = 100) -> list[StudyRecord]:
        """Return the most recent studies."""
        return self.ledger.study_rows(limit=limit)

    def counts(self) -> LedgerCounts:
        """Return how many studies, jobs and deliveries are in each state."""
        return self.ledger.counts()


def fleet_of(ledger: Ledger, stalled_after_s: float) -> dict[str, Any] | None:
    """The job queue's view in the scaled-out mode, or ``None`` on one box.

    Parameters
    ----------
    ledger
        The node's ledger; only the PostgreSQL one with its job queue has a fleet.
    stalled_after_s
        ``queue.stalled_after_s``: a worker silent this long is stalled, and so is its job.

    Returns
    -------
    dict or None
        ``queues``: per queue, jobs waiting (``todo``), running (``doing``), ``stalled``,
        ``retrying`` and ``dead``; ``workers``: each registered worker's id, host, device,
        analyses, pid, seconds since its heartbeat and current job (study, analysis, queue).
    """
    depths = getattr(ledger, "queue_depths", None)
    workers = getattr(ledger, "workers", None)
    if depths is None or workers is None:
        return None
    return {"queues": depths(stalled_after_s), "workers": workers(stalled_after_s),
            "stalled_after_s": stalled_after_s}
