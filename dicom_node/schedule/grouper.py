"""When is a study complete: its needed series all arrived (source inventory), a quiet period, or a maximum wait."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

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


class StudyTracker:
    """Turns studies whose instances stopped arriving into jobs.

    A study is complete when no new instance arrived for ``quiet_period_s`` or when
    ``max_wait_s`` has passed since its first instance, whichever comes first. Each
    configured analysis then gets one job per series its rule selects, or a single
    ``not_applicable`` job that says why no series matched. An instance that arrives
    after completion opens a new generation of the study (see :meth:`Ledger.record_instance`).

    A study sent by a configured source (recognised by the calling AE title) is complete
    sooner: the source is asked once which series it sends and how many instances each
    holds, the analyses' rules are applied to that inventory, and the study is complete as
    soon as every selected series has all its instances in the spool, while series no
    analysis needs may still be arriving (they belong to the same generation). When the
    source cannot tell, the quiet period applies and the reason is logged once per study.

    Parameters
    ----------
    clock
        Returns the current time in seconds; injected so tests never sleep.
    sources
        Calling AE title -> source name, for the sources whose inventory is asked.
    inventory
        Asks a source for a study's series (see :data:`Inventory`).
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
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.rules = dict(rules)
        self.default_min_slices = default_min_slices
        self.clock = clock
        self.sources = dict(sources or {})
        self.inventory = inventory
        # study uid -> the source's inventory, or None once it could not be had (logged)
        self._inventories: dict[str, Sequence[SeriesInfo] | None] = {}

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
        """Complete the studies from a source whose needed series all arrived; return new job uids."""
        created: list[str] = []
        receiving = self.ledger.receiving_studies()
        for study_uid in [uid for uid in self._inventories if uid not in receiving]:
            del self._inventories[study_uid]
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
            if any(counts.get(uid, 0) < expected[uid] for uid in needed):
                continue
            jobs = self.ledger.complete_study(
                study_uid, self.clock(), planned, expected_instances=sum(expected.values()),
            )
            created.extend(jobs)
            self._inventories.pop(study_uid, None)
            queued = sum(1 for job in planned if job.state == JobState.QUEUED)
            logger.info(
                "study %s complete: every series an analysis needs arrived from source %s"
                " (%d of %d series); %d job(s) queued, %d analysis(es) not applicable",
                study_uid, source, len(needed), len(expected), queued, len(planned) - queued,
            )
        return created

    def _inventory(self, source: str, study_uid: str) -> Sequence[SeriesInfo] | None:
        if study_uid in self._inventories:
            return self._inventories[study_uid]
        if self.inventory is None:
            return None
        try:
            announced: Sequence[SeriesInfo] | None = self.inventory(source, study_uid)
        except SourceUnavailable as exc:
            logger.warning(
                "study %s: cannot ask source %s which series it sends (%s); the study is complete"
                " after the quiet period (grouping.quiet_period_s = %g s)",
                study_uid, source, exc.reason, self.settings.quiet_period_s,
            )
            announced = None
        self._inventories[study_uid] = announced
        return announced
