"""Walks folders of instance files: the one definition of which files a folder holds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def iter_files(root: Path, *, include_hidden: bool = False) -> Iterator[Path]:
    """Yield the regular files under ``root`` at any depth, or ``root`` itself if it is a file.

    Paths come sorted. Symbolic links to files are yielded; symbolic links to folders are not
    followed. A folder that does not exist holds no files.

    Parameters
    ----------
    root
        A folder, or a single file.
    include_hidden
        Also yield files whose path below ``root`` has a part starting with ``.`` (a hidden file,
        or any file in a hidden folder); by default they are skipped.

    Yields
    ------
    pathlib.Path
        Each file, in sorted order.
    """
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if include_hidden or not any(part.startswith(".") for part in path.relative_to(root).parts):
            yield path
