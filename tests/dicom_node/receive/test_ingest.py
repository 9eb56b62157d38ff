"""Files into the spool and ledger like C-STORE instances: complete files only, reasons for refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom
import pytest

from dicom_node import status
from dicom_node.config import NodeSettings
from dicom_node.errors import RejectedInstance
from dicom_node.receive.ingest import Ingestor
from dicom_node.state.sqlite import SqliteLedger
from dicom_node.receive.scp import ReceiveCounters
from dicom_node.receive.spool import Spool
from tests.conftest import HIPPO_CROP_STUDY1


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    return Ingestor(NodeSettings(min_free_disk_bytes=0), Spool(tmp_path / "spool"),
                    SqliteLedger(tmp_path / "ledger.sqlite3"), counters=ReceiveCounters())


def test_a_series_folder_is_stored_like_received_instances(ingestor: Ingestor) -> None:
    report = ingestor.ingest_tree(HIPPO_CROP_STUDY1, origin="watch")
    assert len(report.stored) == 32 and report.rejected == []
    first = pydicom.dcmread(sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[0])
    (study,) = report.study_uids
    assert study == first.StudyInstanceUID
    (info,) = ingestor.ledger.series_of_study(study)
    assert info.instance_count == 32 and info.modality == "MR"
    by_sop = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in HIPPO_CROP_STUDY1.glob("*.dcm")}
    for stored in report.stored:  # stored exactly as they were, byte for byte
        assert Path(stored.path).read_bytes() == by_sop[stored.sop_instance_uid].read_bytes()
    assert getattr(ingestor.ledger.study(study), "origin", None) == "watch"
    manifest = {m.sop_instance_uid: m for m in ingestor.ledger.manifest(info.series_uid)}
    for sop, source in by_sop.items():  # the manifest a remote worker verifies against
        data = source.read_bytes()
        assert manifest[sop].size_bytes == len(data)
        assert manifest[sop].sha256 == hashlib.sha256(data).hexdigest()


def test_truncated_garbage_and_uid_less_files_are_refused(ingestor: Ingestor, tmp_path: Path) -> None:
    data = (HIPPO_CROP_STUDY1 / "1.dcm").read_bytes()
    (tmp_path / "half.dcm").write_bytes(data[: len(data) - 700])
    (tmp_path / "text.dcm").write_text("not dicom at all")
    ds = pydicom.dcmread(HIPPO_CROP_STUDY1 / "1.dcm")
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "no-series.dcm")
    refused = {}
    for name in ("half.dcm", "text.dcm", "no-series.dcm"):
        with pytest.raises(RejectedInstance) as info:
            ingestor.ingest_file(tmp_path / name, origin="watch")
        refused[name] = info.value
    assert "truncated" in refused["half.dcm"].reason
    assert refused["text.dcm"].status == status.CANNOT_UNDERSTAND
    assert refused["no-series.dcm"].status == status.INVALID_IDENTIFIERS
    assert "SeriesInstanceUID is missing" in refused["no-series.dcm"].reason
    assert sum(ingestor.counters.rejected.values()) == 3 and ingestor.counters.stored == 0
