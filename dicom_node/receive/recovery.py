"""Start-up recovery of the spool: record instance files whose ledger commit was lost."""

from __future__ import annotations

import hashlib
import logging

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.receive.ingest import series_attributes
from dicom_node.receive.spool import Spool
from dicom_node.state.ledger import Ledger
from dicom_node.state.records import InstanceRecord

logger = logging.getLogger(__name__)


def recover_spool(spool: Spool, ledger: Ledger, now: float) -> int:
    """Record spool files the ledger lacks (a commit lost to a power cut); return how many.

    A file in the spool was fsynced before it was acknowledged, so it was received; its
    study then completes and is analysed like any other.
    """
    known = ledger.recorded_paths()
    recovered = 0
    for path in sorted(spool.root.glob("*/*/*.dcm")):
        if str(path) in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            logger.error("spool file %s is unreadable, left in place: %s", path, exc)
            continue
        record = InstanceRecord(
            sop_instance_uid=path.stem, series_uid=path.parent.name,
            study_uid=path.parent.parent.name, sop_class_uid=str(ds.get("SOPClassUID", "")),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")), path=str(path),
            size_bytes=path.stat().st_size, calling_ae_title="(recovered)", received_at=now,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        ledger.record_instance(record, series_attributes(ds))
        recovered += 1
    return recovered
