"""The folder walker: which files a folder holds, in what order."""

from __future__ import annotations

from pathlib import Path

from dicom_node.receive.files import iter_files


def _tree(root: Path) -> None:
    for name in ("b/2.dcm", "b/1.dcm", "a.dcm", ".hidden.dcm", ".cache/x.dcm", "c/.d/y.dcm"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (root / "empty").mkdir()


def test_files_at_any_depth_sorted_hidden_skipped(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path)] == ["a.dcm", "b/1.dcm", "b/2.dcm"]


def test_hidden_files_and_folders_on_request(tmp_path: Path) -> None:
    _tree(tmp_path)
    names = [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path, include_hidden=True)]
    assert names == sorted(names) and {".hidden.dcm", ".cache/x.dcm", "c/.d/y.dcm"} <= set(names)


def test_a_file_is_its_own_listing_and_a_missing_folder_holds_nothing(tmp_path: Path) -> None:
    _tree(tmp_path)
    assert list(iter_files(tmp_path / "a.dcm")) == [tmp_path / "a.dcm"]
    assert list(iter_files(tmp_path / "nowhere")) == []


def test_links_to_files_are_listed_links_to_folders_not_followed(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "link.dcm").symlink_to(tmp_path / "a.dcm")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    names = [p.relative_to(tmp_path).as_posix() for p in iter_files(tmp_path)]
    assert "link.dcm" in names and not any(n.startswith("loop/") for n in names)
