"""Instance files on disk: atomic, fsynced writes under data_dir/spool/<study>/<series>/<sop>.dcm."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    """Return whether ``uid`` is a syntactically valid DICOM UID (PS3.5 9.1)."""
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


class Spool:
    """The instance store.

    Files are written to a temporary name in the destination folder, fsynced, then renamed
    into place and the folder fsynced, so an instance is either wholly on disk or absent
    after a crash at any point. ``fsync=False`` keeps the atomic rename but leaves flushing
    to the operating system: safe against a crash of the node, not against a power cut.
    """

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Return where an instance lives.

        Raises
        ------
        ValueError
            If any UID is not a valid DICOM UID (which would also be unsafe as a file name).
        """
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def write(self, path: Path, *parts: bytes | memoryview) -> None:
        """Write ``parts``, concatenated, to ``path`` atomically and durably."""
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            views = [memoryview(part) for part in parts]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, path)
        if self.fsync:
            fsync_dir(folder)

    def free_bytes(self) -> int:
        """Return the free space on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's files (retention clean-up); a missing folder is fine.

        Raises
        ------
        ValueError
            If ``study_uid`` is not a valid UID (it could name a path outside the spool).
        OSError
            If a file cannot be deleted: the caller must then keep its ledger rows.
        """
        if not is_valid_uid(study_uid):
            raise ValueError(f"invalid UID {study_uid!r}")
        folder = self.root / study_uid
        if folder.exists():
            shutil.rmtree(folder)
            if self.fsync:
                fsync_dir(self.root)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a crash mid-write; return how many."""
        count = 0
        for tmp in self.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
            count += 1
        return count


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (fsync the directory)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write any file (results, JSON) atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
