"""Results into an Orthanc source through its REST API (``destination = "source:NAME"``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import httpx

from dicom_node.errors import DeliveryFailed
from dicom_node.receive.source import OrthancSource

#: How an analysis names a source as a destination of its results.
SOURCE_PREFIX = "source:"
_HTTP_CODE = re.compile(r"HTTP code: (\d{3})")


def store_files(files: Sequence[Path | str], source: OrthancSource) -> list[str]:
    """Store DICOM files into Orthanc with ``POST /instances``, one request per file.

    Returns
    -------
    list[str]
        Orthanc's identifiers of the stored instances (stored now, or already stored: the
        result UIDs are deterministic, so a retry replaces rather than duplicates).

    Raises
    ------
    DeliveryFailed
        ``retryable=True`` when Orthanc could not be reached, timed out or answered a server
        error (5xx); ``retryable=False`` when a file is unreadable or Orthanc refused the
        request (4xx: not DICOM, or the credentials were refused).
    """
    stored = []
    where = f"source {source.name} ({source.settings.url})"
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DeliveryFailed(f"file {path} is unreadable: {exc.strerror}", retryable=False) from exc
        try:
            answer = source.client.post_instances(content=data)
        except httpx.TransportError as exc:
            raise DeliveryFailed(f"cannot reach {where}: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            code = _HTTP_CODE.search(str(exc))
            retryable = code is None or code.group(1).startswith("5")
            raise DeliveryFailed(f"{where} refused {Path(path).name}: {str(exc)[:200]}",
                                 retryable=retryable) from exc
        if not isinstance(answer, dict) or answer.get("Status") not in ("Success", "AlreadyStored"):
            raise DeliveryFailed(f"{where} did not store {Path(path).name}: {answer!r:.200}", retryable=True)
        stored.append(str(answer.get("ID")))
    return stored
