"""Place a volume against normative data by age, sex and side, or say why no percentile is given."""

from __future__ import annotations

import datetime
import re

from pydicom.dataset import Dataset

#: No normative table ships: none whose figures and licence could be verified was available
#: when this was built, and a range is never invented. The statement says so on every report.
NO_NORMATIVE_DATA = "no published normative data with verifiable figures is bundled with this node"


def patient_age_years(source: Dataset) -> float | None:
    """The patient's age at the study, from PatientAge, else PatientBirthDate and StudyDate.

    Returns
    -------
    float or None
        Age in years, ``None`` when neither gives one.
    """
    age = str(source.get("PatientAge", "") or "")
    match = re.fullmatch(r"(\d{3})([DWMY])", age)
    if match:
        per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
        return int(match.group(1)) / per_year
    try:
        born = datetime.datetime.strptime(str(source.get("PatientBirthDate", "")), "%Y%m%d").date()
        studied = datetime.datetime.strptime(str(source.get("StudyDate", "")), "%Y%m%d").date()
    except ValueError:
        return None
    if studied < born:
        return None
    return (studied - born).days / 365.25


def percentile_statement(source: Dataset, side: str, side_reason: str) -> str:
    """Why no percentile is shown: the missing normative data, and any missing age, sex or side.

    Parameters
    ----------
    source
        An analysed image (patient and study attributes).
    side, side_reason
        As the analysis judged them (``"unknown"`` with a reason, or ``"left"``/``"right"``).

    Returns
    -------
    str
        E.g. ``"No percentile: no published normative data ...; also missing: sex (PatientSex
        empty), side (...)"``.
    """
    missing = []
    if patient_age_years(source) is None:
        missing.append("age (no PatientAge, nor PatientBirthDate with StudyDate)")
    if str(source.get("PatientSex", "") or "") not in ("M", "F"):
        missing.append("sex (PatientSex is not M or F)")
    if side not in ("left", "right"):
        missing.append(f"side ({side_reason or 'not determined'})")
    statement = f"No percentile: {NO_NORMATIVE_DATA}"
    if missing:
        statement += "; also missing: " + ", ".join(missing)
    return statement
