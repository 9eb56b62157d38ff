"""Shared fixtures: where the real data lives, and a clock tests can move."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from tests import postgres
from tests.postgres import Cluster

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HIPPO_DICOM = SHARED_DATA / "hippocampus-dicom"
HIPPO_CROP_STUDY1 = HIPPO_DICOM / "Study1" / "13_HCropVolume"


def sr_content_items(sequence: Iterable[Dataset]) -> list[Dataset]:
    """Return every content item of an SR content tree, depth first.

    Parameters
    ----------
    sequence
        A ``ContentSequence``: the SR document's, or a content item's.

    Returns
    -------
    list[Dataset]
        Each item, followed by the items nested under it.
    """
    items: list[Dataset] = []
    for item in sequence:
        items.append(item)
        if "ContentSequence" in item:
            items.extend(sr_content_items(item.ContentSequence))
    return items


class FakeClock:
    """A clock tests advance by hand, so grouping and retry tests never sleep."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real data not found at {SHARED_DATA} (../shared beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], list[str]]:
    """Run dciodvfy on a file, print its warnings and return its error lines."""
    executable = shutil.which("dciodvfy")
    if executable is None:
        pytest.fail("dciodvfy is not on PATH: run scripts/setup.sh (apt package dicom3tools)")

    def run(path: Path) -> list[str]:
        completed = subprocess.run(
            [executable, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        lines = (completed.stdout + completed.stderr).splitlines()
        for line in lines:
            if line.startswith("Warning"):
                print(f"dciodvfy {path.name}: {line}")
        return [line for line in lines if line.startswith("Error")]

    return run


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster for the session (skipped where PostgreSQL is absent)."""
    reason = postgres.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with postgres.running_cluster() as cluster:
        yield cluster
