"""Put instances into the spool and the ledger: one path for C-STORE, the watch folder and HTTP jobs."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node import status
from dicom_node.config import NodeSettings
from dicom_node.errors import RejectedInstance
from dicom_node.state.records import InstanceRecord, Origin
from dicom_node.state.ledger import Ledger
from dicom_node.receive.files import iter_files
from inference.base import join_values
from dicom_node.receive.spool import Spool, is_valid_uid
from dicom_node.receive.structure import check_structure, data_set_offset

logger = logging.getLogger(__name__)


def raw_uid(ds: Dataset, keyword: str) -> str:
    """Return a UID element's text as sent, without pydicom's value conversion.

    The node checks UIDs itself (:func:`dicom_node.receive.spool.is_valid_uid`), with its own status
    and reason; converting first would only warn about the same problem.
    """
    element = ds.get_item(keyword)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").rstrip("\x00 ")
    return str(value or "")


def series_attributes(ds: Dataset) -> dict[str, Any]:
    """Return the series-level attributes selection rules look at, as ledger columns."""

    def number(keyword: str) -> Any:
        value = ds.get(keyword)
        try:
            return None if value in (None, "") else float(value)
        except (TypeError, ValueError):
            return None

    def numbers(keyword: str) -> str | None:
        value = ds.get(keyword)
        try:
            return json.dumps([float(v) for v in value]) if value else None
        except (TypeError, ValueError):
            return None

    frames = number("NumberOfFrames")
    return {
        "modality": str(ds.get("Modality", "")),
        "description": str(ds.get("SeriesDescription", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "rows": ds.get("Rows"),
        "columns": ds.get("Columns"),
        "orientation": numbers("ImageOrientationPatient"),
        "pixel_spacing": numbers("PixelSpacing"),
        "slice_thickness": number("SliceThickness"),
        "number_of_frames": int(frames) if frames is not None else None,
        "convolution_kernel": join_values(ds.get("ConvolutionKernel")),
    }


@dataclass(frozen=True)
class InstanceIds:
    """The identifiers of an instance and its series attributes, read from its header."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    series: dict[str, Any]


def identify(ds: Dataset) -> InstanceIds:
    """Read and check an instance's identifiers.

    Raises
    ------
    RejectedInstance
        ``CANNOT_UNDERSTAND`` if the header cannot be decoded, ``INVALID_IDENTIFIERS`` if a
        Study, Series or SOP Instance UID is missing or invalid.
    """
    try:
        ids = InstanceIds(
            study_uid=raw_uid(ds, "StudyInstanceUID"),
            series_uid=raw_uid(ds, "SeriesInstanceUID"),
            sop_instance_uid=raw_uid(ds, "SOPInstanceUID"),
            sop_class_uid=raw_uid(ds, "SOPClassUID"),
            series=series_attributes(ds),
        )
    except Exception as exc:  # pydicom raises many types for corrupt data
        raise RejectedInstance(status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {exc}") from exc
    for keyword, uid in (
        ("StudyInstanceUID", ids.study_uid),
        ("SeriesInstanceUID", ids.series_uid),
        ("SOPInstanceUID", ids.sop_instance_uid),
    ):
        if not is_valid_uid(uid):
            problem = "missing" if not uid else f"invalid ({uid[:24]!r})"
            raise RejectedInstance(status.INVALID_IDENTIFIERS, f"{keyword} is {problem}")
    return ids


def persist(
    ids: InstanceIds,
    parts: tuple[bytes | memoryview, ...],
    *,
    transfer_syntax_uid: str,
    spool: Spool,
    ledger: Ledger,
    min_free_disk_bytes: int,
    calling_ae_title: str,
    received_at: float,
    origin: Origin = Origin.DICOM,
) -> InstanceRecord:
    """Write an instance to the spool (atomic, fsynced) and record it in the ledger.

    Raises
    ------
    RejectedInstance
        ``OUT_OF_RESOURCES`` when the disk is full or the ledger cannot record it,
        ``PROCESSING_FAILURE`` when the file cannot be written.
    """
    if spool.free_bytes() < min_free_disk_bytes:
        raise RejectedInstance(status.OUT_OF_RESOURCES, "spool disk is full")
    path = spool.path_for(ids.study_uid, ids.series_uid, ids.sop_instance_uid)
    try:
        spool.write(path, *parts)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RejectedInstance(status.OUT_OF_RESOURCES, "spool disk is full") from exc
        raise RejectedInstance(
            status.PROCESSING_FAILURE, f"cannot write instance: {exc.strerror}"
        ) from exc
    record = InstanceRecord(
        sop_instance_uid=ids.sop_instance_uid,
        series_uid=ids.series_uid,
        study_uid=ids.study_uid,
        sop_class_uid=ids.sop_class_uid,
        transfer_syntax_uid=transfer_syntax_uid,
        path=str(path),
        size_bytes=sum(len(part) for part in parts),
        calling_ae_title=calling_ae_title,
        received_at=received_at,
        origin=origin,
        sha256=_sha256(parts),
    )
    try:
        ledger.record_instance(record, ids.series)
    except Exception as exc:  # sqlite3 errors: disk full, locked beyond timeout
        raise RejectedInstance(
            status.OUT_OF_RESOURCES, f"cannot record instance in the ledger: {exc}"
        ) from exc
    return record


def _sha256(parts: tuple[bytes | memoryview, ...]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def parse_part10(data: bytes) -> Dataset:
    """Parse a DICOM Part 10 file held in memory (pixel data as bytes, not decoded).

    Raises
    ------
    RejectedInstance
        ``CANNOT_UNDERSTAND`` if it is not a complete Part 10 file.
    """
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError) as exc:
        raise RejectedInstance(status.CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
    if not ds.file_meta.get("TransferSyntaxUID"):
        raise RejectedInstance(status.CANNOT_UNDERSTAND, "no TransferSyntaxUID in the file meta")
    # The same walk as for a C-STORE: one completeness check for every way in.
    check_structure(memoryview(data)[data_set_offset(data):], ds.file_meta.TransferSyntaxUID,
                    str(ds.file_meta.get("MediaStorageSOPClassUID", "")) or None)
    return ds


@dataclass
class IngestReport:
    """What one ingest of files did: the records stored and the files refused, with reasons."""

    stored: list[InstanceRecord] = field(default_factory=list)
    rejected: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def study_uids(self) -> list[str]:
        """The studies of the stored instances, in order of first appearance."""
        return list(dict.fromkeys(r.study_uid for r in self.stored))


class Ingestor:
    """Stores DICOM files into the spool and ledger exactly as the Storage SCP stores instances.

    Parameters
    ----------
    settings
        The ``[node]`` section (free-space threshold).
    counters
        Where stored and rejected instances are counted (``ReceiveCounters``-like).
    on_stored
        Called with the study UID after each instance is recorded.
    """

    def __init__(
        self,
        settings: NodeSettings,
        spool: Spool,
        ledger: Ledger,
        *,
        counters: Any = None,
        clock: Callable[[], float] = time.time,
        on_stored: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.counters = counters
        self.clock = clock
        self.on_stored = on_stored

    def ingest_file(self, path: Path, *, origin: Origin) -> InstanceRecord:
        """Store one file; return its record.

        Raises
        ------
        RejectedInstance
            With the status a C-STORE would have answered and the reason.
        """
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RejectedInstance(status.CANNOT_UNDERSTAND, f"not a readable DICOM file: {exc}") from exc
        return self.ingest_bytes(data, origin=origin, calling_ae_title=f"({origin})")

    def ingest_bytes(self, data: bytes, *, origin: Origin, calling_ae_title: str) -> InstanceRecord:
        """Store one DICOM Part 10 file given as bytes, as sent by ``calling_ae_title``; return its record.

        Raises
        ------
        RejectedInstance
            With the status a C-STORE would have answered and the reason.
        """
        try:
            ds = parse_part10(data)
            ids = identify(ds)
            record = persist(
                ids, (data,), transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                spool=self.spool, ledger=self.ledger,
                min_free_disk_bytes=self.settings.min_free_disk_bytes,
                calling_ae_title=calling_ae_title, received_at=self.clock(), origin=origin,
            )
        except RejectedInstance as exc:
            if self.counters is not None:
                self.counters.add_rejected(status.describe(exc.status))
            raise
        if self.counters is not None:
            self.counters.add_stored(record.size_bytes)
        if self.on_stored is not None:
            self.on_stored(record.study_uid)
        return record

    def ingest_tree(self, root: Path, *, origin: Origin) -> IngestReport:
        """Store every file under ``root`` (hidden files skipped); refusals are reported, not raised."""
        report = IngestReport()
        for path in iter_files(root):
            try:
                report.stored.append(self.ingest_file(path, origin=origin))
            except RejectedInstance as exc:
                report.rejected.append((path, exc.reason))
        logger.info("ingested %d instance(s) from %s (%s), %d refused",
                    len(report.stored), root, origin, len(report.rejected))
        return report
