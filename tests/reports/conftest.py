"""Fixtures for the reports tests: the real HippoCrop series, a label map and dciodvfy."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.base import Finding, Measurement, Structure
from reports.identity import Identity

logger = logging.getLogger(__name__)

SERIES_DIR = (
    Path(__file__).resolve().parents[3]
    / "shared"
    / "data"
    / "hippocampus-dicom"
    / "Study1"
    / "13_HCropVolume"
)
ARTIFACTS_DIR = Path(__file__).resolve().parents[1] / "artifacts"

ANATOMICAL_STRUCTURE = ("91723000", "SCT", "Anatomical Structure")
HIPPOCAMPUS = ("5366008", "SCT", "Hippocampus")
LEFT = ("7771000", "SCT", "Left")
VOLUME = ("118565006", "SCT", "Volume")
CUBIC_MILLIMETRE = ("mm3", "UCUM", "cubic millimeter")
MR_BRAIN = ("24590-2", "LN", "MR Brain")


@pytest.fixture(scope="session")
def source_images() -> list[Dataset]:
    """The 32 HippoCrop slices, sorted along the slice normal."""
    if not SERIES_DIR.is_dir():
        pytest.fail(f"real data not found at {SERIES_DIR} (../shared beside the repository)")
    images: list[Dataset] = [pydicom.dcmread(path) for path in SERIES_DIR.glob("*.dcm")]
    orientation = np.array(images[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    images.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))
    return images


@pytest.fixture(scope="session")
def label_map(source_images: list[Dataset]) -> np.ndarray:
    """Two ellipsoid blobs: 1 anterior (slices 8-15), 2 posterior (slices 16-24)."""
    shape = (len(source_images), int(source_images[0].Rows), int(source_images[0].Columns))
    z, y, x = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint8)
    anterior = ((z - 12) / 3.6) ** 2 + ((y - 18) / 7.0) ** 2 + ((x - 15) / 5.0) ** 2 <= 1.0
    posterior = ((z - 20) / 4.2) ** 2 + ((y - 31) / 6.0) ** 2 + ((x - 18) / 5.5) ** 2 <= 1.0
    labels[anterior] = 1
    labels[posterior & ~anterior] = 2
    return labels


@pytest.fixture(scope="session")
def structures() -> tuple[Structure, ...]:
    return (
        Structure(1, "anterior hippocampus", ANATOMICAL_STRUCTURE, HIPPOCAMPUS, (230, 90, 60)),
        Structure(2, "posterior hippocampus", ANATOMICAL_STRUCTURE, HIPPOCAMPUS, (70, 150, 240), LEFT),
    )


@pytest.fixture(scope="session")
def measurements(
    source_images: list[Dataset], label_map: np.ndarray, structures: tuple[Structure, ...]
) -> tuple[Measurement, ...]:
    """Volumes by voxel counting (1 mm voxels), one per structure plus the total."""
    row_mm, column_mm = (float(v) for v in source_images[0].PixelSpacing)
    voxel_mm3 = row_mm * column_mm * float(source_images[0].SliceThickness)
    per_structure = tuple(
        Measurement(s.name, VOLUME, float((label_map == s.label).sum()) * voxel_mm3, CUBIC_MILLIMETRE, s.label)
        for s in structures
    )
    total = Measurement(
        "total hippocampus", VOLUME, sum(m.value for m in per_structure), CUBIC_MILLIMETRE, None
    )
    return (*per_structure, total)


@pytest.fixture(scope="session")
def findings() -> tuple[Finding, ...]:
    return (
        Finding(
            "hippocampal atrophy",
            ("404684003", "SCT", "Finding"),
            "absent",
            {"absent": 0.83, "present": 0.17},
        ),
    )


@pytest.fixture(scope="session")
def identity() -> Identity:
    return Identity(
        manufacturer_model_name="dicom-node",
        software_versions="0.1.0",
        device_serial_number="node-test-1",
        algorithm_name="hippocampus-unet",
        algorithm_version="1.2.0",
        institution_name="Test Hospital",
    )


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR


