"""The watch folder with an injected clock: files are taken only once settled and complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicom_node.config import NodeSettings, WatchSettings
from dicom_node.receive.ingest import Ingestor
from dicom_node.state.sqlite import SqliteLedger
from dicom_node.receive.spool import Spool
from dicom_node.receive.watch import WatchFolder
from tests.conftest import HIPPO_CROP_STUDY1, FakeClock


def make_watcher(tmp_path: Path, clock: FakeClock, **settings: object) -> WatchFolder:
    ingestor = Ingestor(NodeSettings(min_free_disk_bytes=0), Spool(tmp_path / "spool"),
                        SqliteLedger(tmp_path / "ledger.sqlite3"))
    watch = WatchSettings(dir=tmp_path / "in", settle_s=2.0, give_up_s=10.0, **settings)  # type: ignore[arg-type]
    (tmp_path / "in").mkdir()
    return WatchFolder(watch, ingestor, rejected_default=tmp_path / "rejected", clock=clock)


def test_a_file_being_written_waits_until_settled_and_complete(tmp_path: Path, clock: FakeClock) -> None:
    watcher = make_watcher(tmp_path, clock)
    data = (HIPPO_CROP_STUDY1 / "1.dcm").read_bytes()
    target = tmp_path / "in" / "slice.dcm"
    target.write_bytes(data[:2000])
    assert watcher.scan() == 0
    clock.advance(5.0)  # unchanged for longer than settle_s, but truncated: not taken, not rejected
    assert watcher.scan() == 0 and target.exists()
    with target.open("ab") as handle:
        handle.write(data[2000:])
    assert watcher.scan() == 0  # changed: settling starts again
    clock.advance(1.0)
    assert watcher.scan() == 0
    clock.advance(1.5)
    assert watcher.scan() == 1
    assert not target.exists() and len(watcher.ingestor.ledger.recorded_paths()) == 1


def test_trees_move_to_processed_and_broken_files_are_rejected_with_a_reason(
    tmp_path: Path, clock: FakeClock
) -> None:
    watcher = make_watcher(tmp_path, clock, processed_dir=tmp_path / "done")
    shutil.copytree(HIPPO_CROP_STUDY1, tmp_path / "in" / "export" / "series1")
    (tmp_path / "in" / "export" / "notes.txt").write_text("not an image")
    watcher.scan()
    clock.advance(3.0)
    assert watcher.scan() == 32
    assert len(list((tmp_path / "done" / "export" / "series1").glob("*.dcm"))) == 32
    assert not (tmp_path / "in" / "export" / "series1").exists()
    clock.advance(10.0)
    watcher.scan()
    assert (tmp_path / "rejected" / "export" / "notes.txt").exists()
    reason = (tmp_path / "rejected" / "export" / "notes.txt.reason.txt").read_text()
    assert "not a readable DICOM file" in reason
    assert list((tmp_path / "in").iterdir()) == []


def test_watch_settings_need_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="watch.dir"):
        WatchFolder(WatchSettings(), None, rejected_default=tmp_path)  # type: ignore[arg-type]
