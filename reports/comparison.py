"""Compare a result's measurements with the same patient's prior results: change, percent, annualised rate."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reports.protocols import MeasurementLike, PriorLike, StructureLike

logger = logging.getLogger(__name__)

#: The group of a measurement made on no particular structure (as the SR's tracking identifier).
WHOLE_SERIES = "whole series"
DAYS_PER_YEAR = 365.25


def measurement_key(measurement: MeasurementLike, structures: Sequence[StructureLike]) -> str:
    """The key that finds a measurement again in a prior result, SR or ledger alike.

    ``"<group>|<concept code value>|<unit code>"`` where the group is the structure's name
    (the SR group's tracking identifier) or :data:`WHOLE_SERIES`.
    """
    names = {s.label: s.name for s in structures}
    group = names.get(measurement.structure_label, WHOLE_SERIES) if measurement.structure_label else WHOLE_SERIES
    return f"{group}|{measurement.concept[0]}|{measurement.unit[0]}"


def parse_date(value: str) -> datetime.date:
    """A DICOM DA value (``YYYYMMDD``) as a date.

    Raises
    ------
    ValueError
        If the value is not a valid DA.
    """
    return datetime.datetime.strptime(value.strip(), "%Y%m%d").date()


@dataclass(frozen=True)
class Change:
    """One measurement now and in the prior study."""

    key: str
    name: str
    unit: str
    current: float
    prior: float

    @property
    def change(self) -> float:
        """Current minus prior, in the measurement's unit."""
        return self.current - self.prior

    @property
    def percent(self) -> float | None:
        """The change in percent of the prior value; ``None`` when the prior is 0."""
        return None if self.prior == 0 else 100.0 * self.change / self.prior


@dataclass(frozen=True)
class Comparison:
    """The current result against the latest prior, and every prior for the trend.

    ``prior`` is ``None`` when no prior result was found; then ``changes`` is empty.
    """

    study_date: datetime.date | None
    prior: PriorLike | None
    changes: tuple[Change, ...]
    history: tuple[tuple[datetime.date, Mapping[str, float]], ...]
    other_model: bool

    @property
    def interval_days(self) -> int | None:
        """Days between the prior and the current study."""
        if self.prior is None or self.study_date is None:
            return None
        return (self.study_date - parse_date(self.prior.study_date)).days

    def percent_per_year(self, change: Change) -> float | None:
        """The change's percent divided by the interval in years; ``None`` without one."""
        days = self.interval_days
        if change.percent is None or not days or days <= 0:
            return None
        return change.percent / (days / DAYS_PER_YEAR)


def compare(
    measurements: Sequence[MeasurementLike],
    structures: Sequence[StructureLike],
    study_date: str,
    model_name: str,
    model_version: str,
    priors: Sequence[PriorLike],
) -> Comparison:
    """Compare measurements with the latest earlier prior result and list the history.

    Parameters
    ----------
    measurements, structures
        The current result.
    study_date
        The current study's StudyDate (DA); priors dated on or after it are ignored.
    model_name, model_version
        The model of the current result; a prior from another name or version is flagged.
    priors
        Prior results of the same patient and analysis, any order.

    Returns
    -------
    Comparison
        With ``prior`` ``None`` when no usable prior was found.
    """
    try:
        current_date: datetime.date | None = parse_date(study_date)
    except ValueError:
        current_date = None
    usable = []
    for prior in priors:
        try:
            date = parse_date(prior.study_date)
        except ValueError:
            logger.info("prior result of study %s has no valid study date: skipped", prior.study_instance_uid)
            continue
        if current_date is not None and date < current_date:
            usable.append((date, prior))
    usable.sort(key=lambda item: (item[0], item[1].study_instance_uid))
    current = {measurement_key(m, structures): m for m in measurements}
    history: list[tuple[datetime.date, Mapping[str, float]]] = [(d, dict(p.values)) for d, p in usable]
    if current_date is not None:
        history.append((current_date, {k: float(m.value) for k, m in current.items()}))
    if not usable:
        return Comparison(current_date, None, (), tuple(history), False)
    latest = usable[-1][1]
    changes = tuple(
        Change(key, m.name, m.unit[0], float(m.value), float(latest.values[key]))
        for key, m in current.items()
        if key in latest.values
    )
    other = (latest.model_name, latest.model_version) != (model_name, model_version)
    return Comparison(current_date, latest, changes, tuple(history), other)
