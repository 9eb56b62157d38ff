"""Tests for reports.uids: derived UIDs are persisted identities and never change."""

from __future__ import annotations

import uuid

from reports.identity import Identity
from reports.sr import derive_tracking_uid
from reports.uids import derive_uid, uid_from_name


def test_derived_uids_keep_their_values() -> None:
    # Values filed by earlier releases: viewers and PACS track results by them.
    assert derive_uid("a", "b") == "2.25.165603530038561878966038568001989073379"
    assert derive_tracking_uid("1.2.3/hippocampus/1.0.0", "structure", "1") == (
        "2.25.254738387763659235835367787672809180650"
    )
    identity = Identity(
        manufacturer_model_name="dicom-node",
        software_versions="0.1.0",
        device_serial_number="n1",
        algorithm_name="net",
        algorithm_version="2",
    )
    assert identity.device_uid == "2.25.56899717016823926330855441550582242352"


def test_uid_from_name_depends_on_namespace_and_every_part() -> None:
    name = ("1.2", "seg-series")
    uid = uid_from_name(uuid.NAMESPACE_OID, name)
    assert uid == uid_from_name(uuid.NAMESPACE_OID, list(name))
    assert uid != uid_from_name(uuid.NAMESPACE_URL, name)
    assert uid != uid_from_name(uuid.NAMESPACE_OID, ("1.2", "seg-series", "x"))
    assert uid != uid_from_name(uuid.NAMESPACE_OID, ("1.2seg-series",))
    assert uid.startswith("2.25.") and len(uid) <= 44
