"""The shape of analysis results that reports read, as structural protocols."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

#: A coded concept as plain data: (code value, coding scheme designator, code meaning).
Code = tuple[str, str, str]


class StructureLike(Protocol):
    """One segmented structure: its value in the label map and how it is coded."""

    @property
    def label(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def category(self) -> Code: ...

    @property
    def property_type(self) -> Code: ...

    @property
    def colour_rgb(self) -> tuple[int, int, int]: ...

    @property
    def laterality(self) -> Code | None: ...


class MeasurementLike(Protocol):
    """One measured value with a UCUM unit, on a structure (by label) or the whole image."""

    @property
    def name(self) -> str: ...

    @property
    def concept(self) -> Code: ...

    @property
    def value(self) -> float: ...

    @property
    def unit(self) -> Code: ...

    @property
    def structure_label(self) -> int | None: ...


class PriorLike(Protocol):
    """A prior result of the same analysis for the same patient, as the node found it.

    ``values`` holds each measurement by the key of :func:`reports.comparison.measurement_key`;
    the ``sr_*`` UIDs identify the prior's SR, empty when it is not known.
    """

    @property
    def study_instance_uid(self) -> str: ...

    @property
    def study_date(self) -> str: ...

    @property
    def model_name(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def values(self) -> Mapping[str, float]: ...

    @property
    def sr_series_instance_uid(self) -> str: ...

    @property
    def sr_sop_instance_uid(self) -> str: ...

    @property
    def origin(self) -> str: ...


class QualityLike(Protocol):
    """How far the analysis trusts its own result: a flag, reasons, check values, derivation."""

    @property
    def low_confidence(self) -> bool: ...

    @property
    def reasons(self) -> Sequence[str]: ...

    @property
    def checks(self) -> Mapping[str, float]: ...

    @property
    def derivation(self) -> str: ...


class FindingLike(Protocol):
    """A classification output: a coded finding with a probability per class."""

    @property
    def name(self) -> str: ...

    @property
    def concept(self) -> Code: ...

    @property
    def predicted_class(self) -> str: ...

    @property
    def probabilities(self) -> Mapping[str, float]: ...
