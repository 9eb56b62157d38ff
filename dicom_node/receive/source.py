"""A configured Orthanc source seen through its REST API: whether it answers, what a study holds.

Every call goes through pyorthanc's :class:`pyorthanc.Orthanc` client. What counts as a study's
content is what the shipped routing script (``orthanc/autoroute.lua``) sends: acquisitions, never
derived objects (SEG, SR, PR, KO, ...), Secondary Captures or the node's own results.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import pyorthanc

from dicom_node.config import SourceSettings
from dicom_node.errors import SourceUnavailable
from dicom_node.state.records import SeriesInfo

logger = logging.getLogger(__name__)

#: Modalities autoroute.lua never sends (its SKIPPED_MODALITIES).
ROUTE_SKIPPED_MODALITIES = frozenset({"SEG", "SR", "PR", "KO", "RTSTRUCT", "REG", "DOC"})
#: Manufacturer the node writes into its results (autoroute.lua's NODE_MANUFACTURER).
NODE_MANUFACTURER = "dicom-node"
#: Secondary Capture SOP classes (PS3.4 B.5), which autoroute.lua never sends.
SECONDARY_CAPTURE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
})


class OrthancSource:
    """The REST client of one ``[sources.NAME]``.

    Parameters
    ----------
    name
        The source's name under ``[sources]`` (for messages).
    settings
        Its validated settings; the password is read now.

    Raises
    ------
    ConfigError
        If the password file or environment variable cannot be read.
    """

    def __init__(self, name: str, settings: SourceSettings) -> None:
        self.name = name
        self.settings = settings
        self.client = pyorthanc.Orthanc(
            settings.url, username=settings.username, password=settings.password(name),
            timeout=settings.timeout_s,
            # Orthanc closes idle keep-alive connections after about a second; a pooled
            # connection reused after that fails with "Server disconnected". A few requests
            # per study do not need keep-alive.
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()

    def _call(self, what: str, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(self.name, f"{what}: {_short(exc)}") from None

    def system(self) -> dict[str, Any]:
        """Return Orthanc's ``/system`` answer (name, version, AE title).

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer.
        """
        answer = self._call("GET /system", self.client.get_system)
        if not isinstance(answer, dict):
            raise SourceUnavailable(self.name, f"GET /system answered {type(answer).__name__}, not an object")
        return answer

    def study_id(self, study_uid: str) -> str:
        """Return Orthanc's identifier of the study ``study_uid``.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer or does not hold the study.
        """
        # pyorthanc's post_tools_lookup passes the UID as form ``data``, which httpx deprecates
        # for raw bytes; the generic POST sends it as the raw body Orthanc expects
        found = self._call("POST /tools/lookup", self.client._post,
                           route=f"{self.client.url}/tools/lookup", content=study_uid.encode())
        for item in found if isinstance(found, list) else []:
            if isinstance(item, dict) and item.get("Type") == "Study":
                return str(item["ID"])
        raise SourceUnavailable(self.name, f"Orthanc holds no study {study_uid}")

    def routed_series(self, study_uid: str) -> list[SeriesInfo]:
        """Return the series of a study that the routing script sends, with Orthanc's counts.

        Each series is described from its main DICOM tags and the tags of its first instance
        (Rows, Columns, PixelSpacing, ...), so selection rules judge it as they would judge
        the received series.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer or does not hold the study.
        """
        return [series.info for series in self.study_series(self.study_id(study_uid), study_uid)]

    def study_series(self, orthanc_id: str, study_uid: str) -> list[OrthancSeries]:
        """Return the routed series of the study Orthanc knows as ``orthanc_id``, with their instances.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer or no longer holds the study.
        """
        series_list = self._call("GET /studies/ID/series", self.client.get_studies_id_series, orthanc_id)
        described = []
        for series in series_list if isinstance(series_list, list) else []:
            instances = series.get("Instances") or []
            if not instances:
                continue
            tags = self._call("GET /instances/ID/simplified-tags",
                              self.client.get_instances_id_simplified_tags, instances[0])
            info = series_info(study_uid, series.get("MainDicomTags") or {}, tags, len(instances))
            if route_skip_reason(info) is None:
                described.append(OrthancSeries(str(series["ID"]), tuple(instances), info))
        return described

    def study_uid(self, orthanc_id: str) -> str:
        """Return the StudyInstanceUID of the study Orthanc knows as ``orthanc_id``.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer or no longer holds the study.
        """
        study = self._call("GET /studies/ID", self.client.get_studies_id, orthanc_id)
        uid = (study.get("MainDicomTags") or {}).get("StudyInstanceUID") if isinstance(study, dict) else None
        if not uid:
            raise SourceUnavailable(self.name, f"study {orthanc_id} has no StudyInstanceUID")
        return str(uid)

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict[str, Any]], int, bool]:
        """Return Orthanc's changes after ``since``: the changes, the last index, whether that is all.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer.
        """
        answer = self._call("GET /changes", self.client.get_changes, params={"since": since, "limit": limit})
        if not isinstance(answer, dict):
            raise SourceUnavailable(self.name, "GET /changes did not answer an object")
        return list(answer.get("Changes") or []), int(answer.get("Last", since)), bool(answer.get("Done", True))

    def last_change(self) -> int:
        """Return the index of Orthanc's latest change.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer.
        """
        answer = self._call("GET /changes?last", self.client.get_changes, params={"last": ""})
        return int(answer.get("Last", 0)) if isinstance(answer, dict) else 0

    def instance_file(self, instance_id: str) -> bytes:
        """Return the DICOM file of one instance, exactly as Orthanc stored it.

        Raises
        ------
        SourceUnavailable
            If Orthanc does not answer or no longer holds the instance.
        """
        data = self._call("GET /instances/ID/file", self.client.get_instances_id_file, instance_id)
        if not isinstance(data, bytes):
            raise SourceUnavailable(self.name, f"GET /instances/{instance_id}/file did not answer a file")
        return data


@dataclass(frozen=True)
class OrthancSeries:
    """One routed series of a study in Orthanc: its Orthanc identifiers and how it looks."""

    orthanc_id: str
    instance_ids: tuple[str, ...]
    info: SeriesInfo


def route_skip_reason(info: SeriesInfo) -> str | None:
    """Return why autoroute.lua does not send this series, or ``None`` when it sends it."""
    if info.modality.upper() in ROUTE_SKIPPED_MODALITIES:
        return f"derived modality {info.modality}"
    if info.manufacturer.strip().lower() == NODE_MANUFACTURER:
        return f"made by {NODE_MANUFACTURER}"
    if info.sop_class_uid in SECONDARY_CAPTURE_SOP_CLASSES:
        return f"secondary capture {info.sop_class_uid}"
    return None


def series_info(study_uid: str, main: Mapping[str, Any], tags: Mapping[str, Any], count: int) -> SeriesInfo:
    """Return a series' :class:`SeriesInfo` from Orthanc's main tags and one instance's simplified tags."""

    def text(key: str) -> str:
        value = main.get(key, tags.get(key, ""))
        return str(value).strip() if value is not None else ""

    def numbers(key: str) -> tuple[float, ...] | None:
        value = tags.get(key) or main.get(key)
        if not value:
            return None
        try:
            return tuple(float(part) for part in str(value).split("\\"))
        except ValueError:
            return None

    def integer(key: str) -> int | None:
        found = numbers(key)
        return int(found[0]) if found else None

    spacing = numbers("PixelSpacing")
    thickness = numbers("SliceThickness")
    return SeriesInfo(
        series_uid=text("SeriesInstanceUID"),
        study_uid=study_uid,
        modality=text("Modality"),
        description=text("SeriesDescription"),
        sop_class_uid=str(tags.get("SOPClassUID", "")),
        manufacturer=text("Manufacturer"),
        rows=integer("Rows"),
        columns=integer("Columns"),
        orientation=numbers("ImageOrientationPatient"),
        pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
        slice_thickness=thickness[0] if thickness else None,
        number_of_frames=integer("NumberOfFrames"),
        instance_count=count,
        convolution_kernel=str(tags.get("ConvolutionKernel", "") or "").strip(),
    )


def _short(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
