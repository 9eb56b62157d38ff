"""When is a study complete: its needed series all arrived (source inventory), a quiet period, or a maximum wait."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor

from dicom_node.config import GroupingSettings
from dicom_node.errors import SourceUnavailable
from dicom_node.state.records import JobState, PlannedJob, SeriesInfo
from dicom_node.state.ledger import Ledger
from dicom_node.schedule.selection import select_series
from inference.base import SeriesRule

logger = logging.getLogger(__name__)

#: Asks a source (by name) which series of a study (by uid) it sends, with their counts;
#: raises :class:`SourceUnavailable` when it cannot tell.
Inventory = Callable[[str, str], Sequence[SeriesInfo]]

#: Questions to sources in flight at once. Each runs on its own thread, so a source that is
#: slow to answer (up to its ``timeout_s``) never pauses the scheduling of other studies.
INVENTORY_THREADS = 4
#: Shortest time between two questions to the ledger for the studies that are due.
DUE_CHECK_INTERVAL_S = 0.05


class StudyTracker:
    """Turns studies whose instances stopped arriving into jobs.

    A study is complete when no new instance arrived for ``quiet_period_s`` or when
    ``max_wait_s`` has passed since its first instance, whichever comes first. Each
    configured analysis then gets one job per series its rule selects, or a single
    ``not_applicable`` job that says why no series matched. An instance that arrives
    after completion opens a new generation of the study (see :meth:`Ledger.record_instance`).

    A study sent by a configured source (recognised by the calling AE title) is complete
    sooner: the source is asked once which series it sends and how many instances each
    holds, the analyses' rules are applied to that inventory, and each job is queued as
    soon as the series it analyses has all its instances in the spool, while other series
    are still arriving. The study is complete once every selected series arrived; series
    no analysis needs may still be arriving then (they belong to the same generation). The
    question runs on a thread of its own (see :data:`INVENTORY_THREADS`) and its answer is
    used by a later tick. When the source cannot tell, the quiet period applies and the
    reason is logged once per study.

    The scheduling loop ticks on every stored instance, for the series-by-series path; the
    ledger is asked which studies are due at most every :data:`DUE_CHECK_INTERVAL_S`, a
    small fraction of any quiet period (one query per instance was a tenth of the node's
    CPU on PostgreSQL).

    Parameters
    ----------
    clock
        Returns the current time in seconds; injected so tests never sleep.
    sources
        Calling AE title -> source name, for the sources whose inventory is asked.
    inventory
        Asks a source for a study's series (see :data:`Inventory`).
    executor
        Runs the questions to sources; by default a pool of :data:`INVENTORY_THREADS` threads
        that :meth:`close` shuts down.
    on_answer
        Called (from the asking thread) when a source answered or failed, so the scheduling
        loop can tick again at once.
    """

    def __init__(
        self,
        ledger: Ledger,
        settings: GroupingSettings,
        rules: Mapping[str, SeriesRule],
        default_min_slices: int,
        *,
        clock: Callable[[], float],
        sources: Mapping[str, str] | None = None,
        inventory: Inventory | None = None,
        executor: Executor | None = None,
        on_answer: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.rules = dict(rules)
        self.default_min_slices = default_min_slices
        self.clock = clock
        self.sources = dict(sources or {})
        self.inventory = inventory
        self.on_answer = on_answer
        self._executor = executor
        self._owns_executor = executor is None
        self._due_checked_at = -math.inf
        # study uid -> the source's inventory, or None once it could not be had (logged)
        self._inventories: dict[str, Sequence[SeriesInfo] | None] = {}
        # study uid -> the question still in flight
        self._questions: dict[str, Future[Sequence[SeriesInfo]]] = {}
        # study uid -> (analysis, series uid) of the jobs queued while the study still receives
        self._started: dict[str, set[tuple[str, str]]] = {}

    def close(self) -> None:
        """Stop asking sources; a question in flight is abandoned, not waited for."""
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        self._questions.clear()

    def plan(self, series: Sequence[SeriesInfo]) -> list[PlannedJob]:
        """Return the jobs a complete study needs, one per analysis and selected series."""
        planned = []
        for analysis, rule in self.rules.items():
            selection = select_series(series, rule, self.default_min_slices)
            for info in selection.selected:
                planned.append(PlannedJob(analysis, info.series_uid))
            if not selection.selected:
                planned.append(
                    PlannedJob(analysis, None, JobState.NOT_APPLICABLE,
                               f"no series matches: {selection.explain()}")
                )
        return planned

    def tick(self) -> list[str]:
        """Complete the studies that are due; return the uids of the jobs created."""
        created = self.complete_from_sources() if self.sources and self.inventory else []
        now = self.clock()
        if now - self._due_checked_at < DUE_CHECK_INTERVAL_S:
            return created
        self._due_checked_at = now
        due = self.ledger.studies_due(now, self.settings.quiet_period_s, self.settings.max_wait_s)
        for study_uid in due:
            series = self.ledger.series_of_study(study_uid)
            planned = self.plan(series)
            # planned on this many instances: if one more arrived meanwhile, the study is
            # not complete after all and the plan may lack its series (next tick re-plans)
            seen = sum(info.instance_count for info in series)
            jobs = self.ledger.complete_study(study_uid, now, planned, instances_seen=seen)
            if not jobs and planned:
                continue
            created.extend(jobs)
            queued = sum(1 for job in planned if job.state == JobState.QUEUED)
            logger.info(
                "study %s complete: %d job(s) queued, %d analysis(es) not applicable",
                study_uid, queued, len(planned) - queued,
            )
        return created

    def complete_from_sources(self) -> list[str]:
        """Queue the jobs whose series arrived from a source, completing studies; return new job uids."""
        created: list[str] = []
        receiving = self.ledger.receiving_studies()
        for study_uid in [uid for uid in {*self._inventories, *self._questions} if uid not in receiving]:
            self._forget(study_uid)
        for study_uid, callers in receiving.items():
            source = next((self.sources[ae] for ae in sorted(callers) if ae in self.sources), None)
            if source is None:
                continue
            announced = self._inventory(source, study_uid)
            if announced is None:
                continue
            planned = self.plan(announced)
            needed = {job.series_uid for job in planned if job.series_uid is not None}
            counts = {info.series_uid: info.instance_count for info in self.ledger.series_of_study(study_uid)}
            expected = {info.series_uid: info.instance_count for info in announced}
            arrived = {uid for uid in needed if counts.get(uid, 0) >= expected[uid]}
            if arrived != needed:
                created.extend(self._start_arrived(study_uid, source, planned, arrived, len(needed)))
                continue
            jobs = self.ledger.complete_study(
                study_uid, self.clock(), planned, expected_instances=sum(expected.values()),
            )
            created.extend(jobs)
            started = len(self._started.get(study_uid, ()))
            self._forget(study_uid)
            queued = sum(1 for job in planned if job.state == JobState.QUEUED)
            logger.info(
                "study %s complete: every series an analysis needs arrived from source %s"
                " (%d of %d series); %d job(s) queued, %d analysis(es) not applicable",
                study_uid, source, len(needed), len(expected), queued, len(planned) - queued,
            )
            if started:
                logger.info("study %s: %d of its job(s) were queued earlier, as their series arrived",
                            study_uid, started)
        return created

    def _start_arrived(
        self, study_uid: str, source: str, planned: Sequence[PlannedJob], arrived: set[str], needed: int,
    ) -> list[str]:
        """Queue the jobs whose series arrived while the study's other needed series still arrive."""
        started = self._started.setdefault(study_uid, set())
        ready = [job for job in planned if job.series_uid in arrived
                 and (job.analysis, job.series_uid) not in started]
        if not ready:
            return []
        jobs = self.ledger.complete_study(study_uid, self.clock(), ready, keep_receiving=True)
        started.update((job.analysis, job.series_uid or "") for job in ready)
        logger.info(
            "study %s: series %s arrived from source %s; %d job(s) queued while %d of %d needed"
            " series still arrive",
            study_uid, ", ".join(sorted({job.series_uid or "" for job in ready})), source, len(jobs),
            needed - len(arrived), needed,
        )
        return jobs

    def _forget(self, study_uid: str) -> None:
        self._inventories.pop(study_uid, None)
        self._started.pop(study_uid, None)
        question = self._questions.pop(study_uid, None)
        if question is not None:
            question.cancel()

    def _inventory(self, source: str, study_uid: str) -> Sequence[SeriesInfo] | None:
        """Return the source's inventory of a study, or ``None`` while asking or once it failed."""
        if study_uid in self._inventories:
            return self._inventories[study_uid]
        question = self._questions.get(study_uid)
        if question is None:
            if self.inventory is None:
                return None
            if self._executor is None:
                self._executor = ThreadPoolExecutor(INVENTORY_THREADS, thread_name_prefix="source-inventory")
                self._owns_executor = True
            question = self._executor.submit(self.inventory, source, study_uid)
            self._questions[study_uid] = question
            if self.on_answer is not None:
                on_answer = self.on_answer
                question.add_done_callback(lambda _: on_answer())
        if not question.done():
            return None
        del self._questions[study_uid]
        try:
            announced: Sequence[SeriesInfo] | None = question.result()
        except SourceUnavailable as exc:
            logger.warning(
                "study %s: cannot ask source %s which series it sends (%s); the study is complete"
                " after the quiet period (grouping.quiet_period_s = %g s)",
                study_uid, source, exc.reason, self.settings.quiet_period_s,
            )
            announced = None
        self._inventories[study_uid] = announced
        return announced
