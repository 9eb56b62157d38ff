"""Deterministic UIDs for results, so a re-run or a retry never files a duplicate series."""

from __future__ import annotations

import uuid

from reports.uids import uid_from_name

#: Namespace of result series and instance UIDs (a fixed, random UUID). Device and tracking
#: UIDs (:func:`reports.uids.derive_uid`) use another; neither may change, since a PACS keeps
#: the UIDs already filed and a re-run under new UIDs would file duplicate series.
_NAMESPACE = uuid.UUID("6c0f4a5e-8a53-4f44-9d35-0b7c7a3e9c21")


def result_uid(*parts: str) -> str:
    """Return a UID (2.25 form, PS3.5 B.2) derived from ``parts``, identical for identical parts.

    Parameters
    ----------
    parts
        What identifies the object, e.g. study UID, source series UID, analysis name,
        model version and the kind of object (``"seg-series"``, ``"seg-instance"``).

    Returns
    -------
    str
        The UID of a name-based UUID of ``parts`` under the node's own namespace.

    Raises
    ------
    ValueError
        If there are no parts, or a part is not a non-empty string.
    """
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError("result_uid needs non-empty string parts")
    return uid_from_name(_NAMESPACE, parts)


def result_uids(
    study_uid: str, series_uid: str, analysis: str, model_version: str
) -> dict[str, str]:
    """Return the series and instance UIDs of every object one analysis files for one series.

    Parameters
    ----------
    study_uid, series_uid
        The source study and series.
    analysis, model_version
        The analysis and the version of its model (options that change the result included).

    Returns
    -------
    dict[str, str]
        ``seg_series``, ``seg_instance``, ``sc_series``, ``sc_instance``, ``sr_series``,
        ``sr_instance`` and ``tracking``, each from :func:`result_uid`.
    """
    base = (study_uid, series_uid, analysis, model_version)
    uids = {}
    for kind in ("seg", "sc", "sr"):
        uids[f"{kind}_series"] = result_uid(*base, f"{kind}-series")
        uids[f"{kind}_instance"] = result_uid(*base, f"{kind}-instance")
    uids["tracking"] = result_uid(*base, "tracking")
    return uids
