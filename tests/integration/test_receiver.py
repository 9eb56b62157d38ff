"""The Storage SCP against real senders: DCMTK storescu/echoscu and pynetdicom."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

from dicom_node import status
from dicom_node.config import NodeSettings
from dicom_node.state.sqlite import SqliteLedger
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from tests.conftest import HIPPO_CROP_STUDY1, SHARED_DATA
from deploy.local.orthanc_process import DCMTK_ENV, free_port

pytestmark = pytest.mark.integration

EDGE = SHARED_DATA / "edge-cases"


def make_scp(tmp_path: Path, **settings: object) -> StorageSCP:
    settings.setdefault("min_free_disk_bytes", 0)
    config = NodeSettings(host="127.0.0.1", port=free_port(), data_dir=tmp_path,
                          **settings)  # type: ignore[arg-type]
    return StorageSCP(config, Spool(tmp_path / "spool"), SqliteLedger(tmp_path / "ledger.sqlite3"))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    server = make_scp(tmp_path, allowed_calling_ae_titles=("STORESCU", "PYSCU"))
    server.start()
    yield server
    server.stop()


def storescu(scp: StorageSCP, *paths: Path, aet: str = "STORESCU", called: str = "DICOMNODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(scp.settings.port),
         *map(str, paths)],
        capture_output=True, text=True, timeout=60, env={**DCMTK_ENV, "PATH": "/usr/bin:/bin"},
    )


def test_storescu_series_is_stored_and_recorded(scp: StorageSCP) -> None:
    files = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    result = storescu(scp, *files, extra=("-R",))
    assert result.returncode == 0, result.stderr
    (info,) = scp.ledger.series_of_study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert info.instance_count == len(files) == 32
    assert info.description == "HippoCrop" and info.modality == "MR"
    for source in files[:3]:
        sent = pydicom.dcmread(source)
        stored = pydicom.dcmread(scp.spool.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID,
                                                    sent.SOPInstanceUID))
        assert stored.PixelData == sent.PixelData
        assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert scp.counters.stored == 32


@pytest.mark.parametrize(
    ("folder", "propose"),
    [("compressed_j2k", "-xv"), ("compressed_jpegls", "-xt"), ("compressed_rle", "-xr")],
)
def test_compressed_instances_are_stored_as_received(
    scp: StorageSCP, folder: str, propose: str
) -> None:
    files = sorted((EDGE / "generic" / folder).rglob("*"))
    files = [f for f in files if f.is_file()]
    # propose the file's own transfer syntax (storescu +C: combined proposal)
    # the sender proposes the files' own compressed syntax next to the uncompressed ones
    result = storescu(scp, *files, extra=(propose,))
    assert result.returncode == 0, result.stderr
    sent = pydicom.dcmread(files[0])
    stored = pydicom.dcmread(scp.spool.path_for(sent.StudyInstanceUID, sent.SeriesInstanceUID,
                                                sent.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert stored.PixelData == sent.PixelData


def test_echo(scp: StorageSCP) -> None:
    result = subprocess.run(
        ["echoscu", "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(scp.settings.port)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_rejected(scp: StorageSCP) -> None:
    result = storescu(scp, next(HIPPO_CROP_STUDY1.glob("*.dcm")), aet="INTRUDER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    assert scp.counters.stored == 0


def test_wrong_called_ae_is_rejected(scp: StorageSCP) -> None:
    result = storescu(scp, next(HIPPO_CROP_STUDY1.glob("*.dcm")), called="SOMEONEELSE")
    assert result.returncode != 0
    assert scp.counters.stored == 0


def send_dataset(scp: StorageSCP, ds: Dataset) -> Dataset:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", scp.settings.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def good_dataset() -> Dataset:
    return pydicom.dcmread(next(HIPPO_CROP_STUDY1.glob("*.dcm")))


def test_missing_study_uid_is_refused_and_association_goes_on(scp: StorageSCP) -> None:
    bad = good_dataset()
    del bad.StudyInstanceUID
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", scp.settings.port, ae_title="DICOMNODE")
    try:
        rsp = assoc.send_c_store(bad)
        assert rsp.Status == status.INVALID_IDENTIFIERS
        assert "StudyInstanceUID is missing" in rsp.ErrorComment
        rsp = assoc.send_c_store(good_dataset())  # same association, next instance
        assert rsp.Status == status.SUCCESS
    finally:
        assoc.release()
    assert scp.counters.stored == 1


def test_invalid_uid_is_refused(scp: StorageSCP) -> None:
    bad = good_dataset()
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        bad.SeriesInstanceUID = "1.2.abc/../../x"
    rsp = send_dataset(scp, bad)
    assert rsp.Status == status.INVALID_IDENTIFIERS
    assert "SeriesInstanceUID is invalid" in rsp.ErrorComment
    assert not any((scp.spool.root).rglob("*.dcm"))


def test_full_disk_answers_out_of_resources(tmp_path: Path) -> None:
    server = make_scp(tmp_path, min_free_disk_bytes=10**18)
    server.start()
    try:
        rsp = send_dataset(server, good_dataset())
    finally:
        server.stop()
    assert rsp.Status == status.OUT_OF_RESOURCES
    assert "disk is full" in rsp.ErrorComment


def test_address_allow_list(tmp_path: Path) -> None:
    server = make_scp(tmp_path, allowed_addresses=("10.255.255.1",))
    server.start()
    try:
        result = storescu(server, next(HIPPO_CROP_STUDY1.glob("*.dcm")))
    finally:
        server.stop()
    assert result.returncode != 0
    assert server.counters.stored == 0


def test_contexts_share_transfer_syntax_uids_so_each_association_copies_them_cheaply(tmp_path: Path) -> None:
    """pynetdicom deep-copies the contexts per association: shared UIDs are copied once."""
    contexts = make_scp(tmp_path).build_ae().supported_contexts
    syntaxes = [uid for context in contexts for uid in context.transfer_syntax]
    assert len(contexts) > 150 and len(syntaxes) > 5000
    assert len({id(uid) for uid in syntaxes}) == len(set(syntaxes))  # one object per syntax
    copied = copy.deepcopy(contexts)
    assert [c.transfer_syntax for c in copied] == [c.transfer_syntax for c in contexts]
    assert len({id(uid) for c in copied for uid in c.transfer_syntax}) == len(set(syntaxes))
