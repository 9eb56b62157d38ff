"""Deterministic UIDs for results, so a re-run or a retry never files a duplicate series."""

from __future__ import annotations

import uuid

#: Namespace of every UID the node derives (a fixed, random UUID).
_NAMESPACE = uuid.UUID("6c0f4a5e-8a53-4f44-9d35-0b7c7a3e9c21")


def result_uid(*parts: str) -> str:
    """Return a UID (2.25 form, PS3.5 B.2) derived from ``parts``, identical for identical parts.

    Parameters
    ----------
    parts
        What identifies the object, e.g. study UID, source series UID, analysis name,
        model version and the kind of object (``"seg-series"``, ``"seg-instance"``).
    """
    if not parts or any(not isinstance(p, str) or not p for p in parts):
        raise ValueError("result_uid needs non-empty string parts")
    # A name-based (version 5) UUID of the parts, written as a 2.25 UID (PS3.5 B.2).
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(0x1F).join(parts)).int}"


def result_uids(
    study_uid: str, series_uid: str, analysis: str, model_version: str
) -> dict[str, str]:
    """Return the series and instance UIDs of every object one analysis files for one series."""
    base = (study_uid, series_uid, analysis, model_version)
    uids = {}
    for kind in ("seg", "sc", "sr"):
        uids[f"{kind}_series"] = result_uid(*base, f"{kind}-series")
        uids[f"{kind}_instance"] = result_uid(*base, f"{kind}-instance")
    uids["tracking"] = result_uid(*base, "tracking")
    return uids
