"""The watch folder: files dropped there are ingested like C-STORE instances once they stop changing."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from dicom_node import status
from dicom_node.config import WatchSettings
from dicom_node.errors import RejectedInstance
from dicom_node.state.records import Origin
from dicom_node.receive.files import iter_files
from dicom_node.receive.ingest import Ingestor

logger = logging.getLogger(__name__)

#: Refusals that say nothing about the file: leave it where it is and try again later.
_TRY_AGAIN = frozenset({status.OUT_OF_RESOURCES, status.PROCESSING_FAILURE})


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


class WatchFolder:
    """Ingests files that appear under ``settings.dir`` (folder trees too).

    watchdog events only wake the loop; each pass walks the tree, so nothing is missed when
    events are dropped. A file is ingested once its size and mtime were unchanged for
    ``settle_s`` and it parses completely (a file still being written may parse up to where
    the writer is); then it is deleted or moved to ``processed_dir``. A file that does not
    parse after ``give_up_s`` unchanged, or whose identifiers are invalid, goes to
    ``rejected_dir`` with ``<name>.reason.txt``.

    Parameters
    ----------
    settings
        The ``[watch]`` section; ``dir`` must be set.
    ingestor
        Stores files exactly like the Storage SCP.
    rejected_default
        Where rejected files go when ``rejected_dir`` is unset.
    clock
        Monotonic time source (injected in tests).
    """

    def __init__(
        self, settings: WatchSettings, ingestor: Ingestor, *, rejected_default: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.dir is None:
            raise ValueError("the watch folder needs watch.dir")
        self.settings = settings
        self.root = settings.dir
        self.ingestor = ingestor
        self.rejected_dir = settings.rejected_dir or rejected_default
        self.processed_dir = settings.processed_dir
        self.clock = clock
        self._seen: dict[Path, _Seen] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        """Create the folders, start watching and the ingest loop."""
        for folder in (self.root, self.rejected_dir, self.processed_dir):
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Wake(self._wake), str(self.root), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self._thread = threading.Thread(target=self._loop, name="watch-folder", daemon=True)
        self._thread.start()
        logger.info("watching %s (settle %.1f s); processed files are %s, rejected go to %s",
                    self.root, self.settings.settle_s,
                    f"moved to {self.processed_dir}" if self.processed_dir else "deleted", self.rejected_dir)

    def stop(self) -> None:
        """Stop watching; a file half-handled stays where it is and is taken at the next start."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5.0)
        if self._thread is not None:
            self._thread.join(10.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except OSError as exc:  # the folder vanished or a disk error: say so, keep watching
                logger.error("watch folder %s: %s", self.root, exc)
            self._wake.wait(self.settings.scan_interval_s)
            self._wake.clear()

    def _skipped(self, path: Path) -> bool:
        return any(folder is not None and path.is_relative_to(folder)
                   for folder in (self.rejected_dir, self.processed_dir))

    def scan(self) -> int:
        """Handle every file that has settled; return how many were ingested."""
        now = self.clock()
        present: set[Path] = set()
        ingested = 0
        for path in iter_files(self.root):
            if self._skipped(path):
                continue
            present.add(path)
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            seen = self._seen.get(path)
            if seen is None or (seen.size, seen.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                self._seen[path] = _Seen(stat.st_size, stat.st_mtime_ns, now)
                continue
            if now - seen.since < self.settings.settle_s:
                continue
            ingested += self._handle(path, now - seen.since)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return ingested

    def _handle(self, path: Path, unchanged_s: float) -> int:
        try:
            record = self.ingestor.ingest_file(path, origin=Origin.WATCH)
        except RejectedInstance as exc:
            if exc.status in _TRY_AGAIN:
                logger.warning("watch folder: %s not stored yet, will retry: %s", path, exc.reason)
                return 0
            if exc.status == status.CANNOT_UNDERSTAND and unchanged_s < self.settings.give_up_s:
                return 0  # perhaps still being written by a writer that pauses; look again later
            self._reject(path, exc.reason)
            return 0
        logger.info("watch folder: stored %s as %s (study %s)", path.name, record.sop_instance_uid,
                    record.study_uid)
        self._done(path)
        return 1

    def _done(self, path: Path) -> None:
        self._seen.pop(path, None)
        if self.processed_dir is None:
            path.unlink(missing_ok=True)
        else:
            target = _unique(self.processed_dir / path.relative_to(self.root))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
        self._prune(path.parent)

    def _reject(self, path: Path, reason: str) -> None:
        self._seen.pop(path, None)
        target = _unique(self.rejected_dir / path.relative_to(self.root))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        target.with_name(f"{target.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
        logger.warning("watch folder: rejected %s: %s", path, reason)
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove folders emptied by ingest, up to (not including) the watch folder."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                os.rmdir(folder)
            except OSError:
                return
            folder = folder.parent
