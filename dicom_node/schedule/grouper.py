"""When is a study complete: a quiet period after its last instance, or a maximum wait."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from dicom_node.config import GroupingSettings
from dicom_node.state.records import JobState, PlannedJob, SeriesInfo
from dicom_node.state.ledger import Ledger
from dicom_node.schedule.selection import select_series
from inference.base import SeriesRule

logger = logging.getLogger(__name__)


class StudyTracker:
    """Turns studies whose instances stopped arriving into jobs.

    A study is complete when no new instance arrived for ``quiet_period_s`` or when
    ``max_wait_s`` has passed since its first instance, whichever comes first. Each
    configured analysis then gets one job per series its rule selects, or a single
    ``not_applicable`` job that says why no series matched. An instance that arrives
    after completion opens a new generation of the study (see :meth:`Ledger.record_instance`).

    Parameters
    ----------
    clock
        Returns the current time in seconds; injected so tests never sleep.
    """

    def __init__(
        self,
        ledger: Ledger,
        settings: GroupingSettings,
        rules: Mapping[str, SeriesRule],
        default_min_slices: int,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.rules = dict(rules)
        self.default_min_slices = default_min_slices
        self.clock = clock

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
        now = self.clock()
        created = []
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
