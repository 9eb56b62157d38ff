"""The scheduling step: complete due studies, hand queued jobs to idle workers, record finished jobs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from dicom_node.config import AnalysisSettings
from dicom_node.run.dispatcher import Completion, WorkerPool
from dicom_node.run.pipeline import JobSpec
from dicom_node.run.priors import PriorSources
from dicom_node.schedule.grouper import StudyTracker
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import JobRecord, JobState, StudyRecord

logger = logging.getLogger(__name__)

#: Jobs that crashed their worker this many times fail instead of crashing it again.
MAX_JOB_ATTEMPTS = 3

#: Called with every job that reached a final state, its study and that state.
JobObserver = Callable[[JobRecord, StudyRecord | None, JobState], None]


class Scheduler:
    """Moves work along the ledger: studies to jobs, jobs to workers, outcomes to deliveries.

    Parameters
    ----------
    ledger
        The node's state.
    tracker
        Decides when studies are complete and plans their jobs.
    analyses
        Settings of every analysis and task a job may name (series numbers, destinations).
    destinations_for
        Returns the destinations of an analysis' results.
    results_dir
        Each job writes its results into ``results_dir/<job uid>``.
    node_name
        The node's AE title, written into results as the device serial number.
    clock
        Wall-clock time source (injected in tests).
    on_finished
        Told about every job that reached a final state (metrics).
    """

    def __init__(
        self,
        ledger: Ledger,
        tracker: StudyTracker,
        analyses: Mapping[str, AnalysisSettings],
        destinations_for: Callable[[str], Sequence[str]],
        results_dir: Path,
        node_name: str,
        *,
        clock: Callable[[], float],
        on_finished: JobObserver,
        priors: PriorSources | None = None,
    ) -> None:
        self.ledger = ledger
        self.tracker = tracker
        self.analyses = dict(analyses)
        self.destinations_for = destinations_for
        self.results_dir = results_dir
        self.node_name = node_name
        self.clock = clock
        self.on_finished = on_finished
        self.priors = priors

    def tick(self) -> list[str]:
        """Complete the studies that are due; return the uids of the jobs created."""
        return self.tracker.tick()

    def dispatch(self, pool: WorkerPool) -> bool:
        """Record finished jobs and start queued ones on idle workers; return whether a job succeeded."""
        succeeded = self.finish(pool.collect())
        while pool.idle_count():
            job = self.ledger.claim_next_job(self.clock(), tuple(self.analyses))
            if job is None:
                break
            if job.attempts > MAX_JOB_ATTEMPTS:
                self._record_failure(job, "the job stopped its worker too many times")
                continue
            spec = self.prepare(job)
            if spec is None:
                continue
            pool.submit(spec)
        return succeeded

    def finish(self, completions: list[Completion]) -> bool:
        """Record the outcomes of finished jobs and queue their deliveries; return whether any succeeded."""
        succeeded = False
        for done in completions:
            job = self.ledger.job(done.spec.job_uid)
            if job is None:
                continue
            now = self.clock()
            if done.outcome is None:
                failure = done.failure
                state = self.ledger.finish_job(
                    job.id, now, state=JobState.FAILED, reason=str(failure),
                    timings={"run": round(done.elapsed_s, 4)},
                )
                self._finished(job.uid)
                logger.warning("%s reason=%r", self.line(job.uid, state),
                               failure.message if failure is not None else None)
                continue
            outcome = done.outcome
            dicom_files = [f for f in outcome.files if f.endswith(".dcm")]
            deliveries = [(d, dicom_files) for d in self.destinations_for(job.analysis)]
            state = self.ledger.finish_job(
                job.id, now, state=JobState.DONE, timings=outcome.timings,
                result_dir=done.spec.result_dir, summary=outcome.summary, deliveries=deliveries,
            )
            self._finished(job.uid)
            if state != JobState.DONE or not deliveries:
                logger.info(self.line(job.uid, state if state != JobState.DONE else "done (no destination)"))
            succeeded = True
        return succeeded

    def line(self, job_uid: str, outcome: str) -> str:
        """Return the canonical log line of a job with ``outcome``."""
        job = self.ledger.job(job_uid)
        if job is None:
            return f"job {job_uid} outcome={outcome}"
        return job.log_line(self.ledger.study(job.study_uid), outcome)

    def prepare(self, job: JobRecord, paths: Sequence[Path] | None = None) -> JobSpec | None:
        """Return the worker's spec of a claimed job, or fail the job when its images are gone.

        ``paths``: the instances' files when they are not at their spool paths (a worker on
        another host fetched them); by default the ledger's spool paths.
        """
        paths = self.ledger.instance_paths(job.series_uid or "") if paths is None else list(paths)
        missing = [p for p in paths if not p.exists()]
        study = None if paths else self.ledger.study(job.study_uid)
        if study is not None and study.purged_at is not None:
            self._record_failure(job, "the study's images were deleted from the spool by retention"
                                      " (node.retention_days); send the study again")
            return None
        if not paths or missing:
            self._record_failure(job, f"{len(missing)} of {len(paths)} instance files are missing")
            return None
        result_dir = self.results_dir / job.uid
        result_dir.mkdir(parents=True, exist_ok=True)
        return JobSpec(
            job_uid=job.uid,
            study_uid=job.study_uid,
            series_uid=job.series_uid or "",
            analysis=job.analysis,
            paths=tuple(str(p) for p in paths),
            result_dir=str(result_dir),
            series_numbers=self.analyses[job.analysis].series_numbers,
            node_name=self.node_name,
            options=job.options,
            priors=self.priors,
        )

    def _record_failure(self, job: JobRecord, reason: str) -> None:
        state = self.ledger.finish_job(job.id, self.clock(), state=JobState.FAILED, reason=reason)
        self._finished(job.uid)
        logger.warning("%s reason=%r", self.line(job.uid, state), reason)

    def _finished(self, job_uid: str) -> None:
        job = self.ledger.job(job_uid)
        if job is not None:
            self.on_finished(job, self.ledger.study(job.study_uid), job.state)
