"""Derive UIDs from names, so that the same name always gives the same UID (PS3.5 B.2)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

#: Joins the parts of a name: a control character, so no UID, code or label contains it.
PART_SEPARATOR = "\x1f"


def uid_from_name(namespace: uuid.UUID, parts: Sequence[str]) -> str:
    """Return the 2.25 UID of a name-based UUID (RFC 4122 version 5) of ``parts``.

    pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores the entropy sources
    and returns a random UUID, so it cannot serve here.

    Parameters
    ----------
    namespace
        The UUID namespace; the same parts under another namespace give another UID.
    parts
        What identifies the thing named by the UID, joined by :data:`PART_SEPARATOR`.

    Returns
    -------
    str
        ``2.25.`` followed by the UUID as a decimal integer, at most 44 characters long.
    """
    return f"2.25.{uuid.uuid5(namespace, PART_SEPARATOR.join(parts)).int}"


def derive_uid(*parts: str) -> str:
    """Derive a UID that is the same whenever the parts are.

    The name is ``dicom-node`` followed by ``parts``, under the RFC 4122 OID namespace.

    Parameters
    ----------
    *parts
        What identifies the thing named by the UID.

    Returns
    -------
    str
        The UID, at most 44 characters long.
    """
    return uid_from_name(uuid.NAMESPACE_OID, ("dicom-node", *parts))
