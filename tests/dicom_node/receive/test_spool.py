from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.receive.spool import Spool, is_valid_uid
from dicom_node.uids import result_uid, result_uids


def test_atomic_write_leaves_no_temporary(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.path_for("1.2", "1.2.3", "1.2.3.4")
    spool.write(path, b"DICM" * 100)
    assert path.read_bytes() == b"DICM" * 100
    assert list(path.parent.iterdir()) == [path]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    folder = tmp_path / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    (folder / ".1.2.3.4.dcm.123.tmp").write_bytes(b"partial")
    assert spool.remove_stale_temporaries() == 1
    assert not any(folder.iterdir())


@pytest.mark.parametrize("uid", ["", "1..2", "../../etc", "1.2.a", "1." + "2" * 70, "1.2."])
def test_invalid_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(ValueError, match="invalid UID"):
        Spool(tmp_path).path_for("1.2", "1.2.3", uid)


def test_result_uids_are_deterministic_and_distinct() -> None:
    first = result_uids("1.2", "1.2.3", "hippocampus", "1.0.0")
    again = result_uids("1.2", "1.2.3", "hippocampus", "1.0.0")
    other = result_uids("1.2", "1.2.3", "hippocampus", "1.0.1")
    assert first == again
    assert len(set(first.values())) == len(first)
    assert not set(first.values()) & set(other.values())
    assert all(is_valid_uid(uid) and uid.startswith("2.25.") for uid in first.values())
    with pytest.raises(ValueError):
        result_uid("1.2", "")


def test_spool_files_missing_from_the_ledger_are_recovered(tmp_path: Path) -> None:
    """As after a power cut that lost the last ledger commits: the fsynced file is the truth."""
    import shutil

    import pydicom

    from dicom_node.receive.recovery import recover_spool
    from dicom_node.state.sqlite import SqliteLedger
    from tests.conftest import HIPPO_CROP_STUDY1

    spool = Spool(tmp_path / "spool")
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    sources = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:3]
    for source in sources:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        path = spool.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, path)
    assert recover_spool(spool, ledger, now=5.0) == 3
    assert recover_spool(spool, ledger, now=6.0) == 0
    (info,) = ledger.series_of_study(str(ds.StudyInstanceUID))
    assert info.instance_count == 3 and info.description == "HippoCrop"
