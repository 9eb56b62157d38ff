"""Tests for reports.sc and reports.preview: a legible, valid Secondary Capture summary page."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import SecondaryCaptureImageStorage

from inference.base import Finding, Measurement, Structure
from reports.identity import Identity
from reports.preview import choose_key_slices, format_value, render_report_png
from reports.sc import build_report_image
from tests.factories import asymmetric_phantom, series_from_ras_volume

from .conftest import ANATOMICAL_STRUCTURE, CUBIC_MILLIMETRE, HIPPOCAMPUS, VOLUME

METHOD = "3D U-Net on the hippocampus crop; volumes by voxel counting"


def _has_colour(image: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.all(image == np.array(colour, dtype=np.uint8), axis=-1).any())


def test_report_image_valid_and_legible(
    tmp_path: Path,
    artifacts_dir: Path,
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    measurements: tuple[Measurement, ...],
    findings: tuple[Finding, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    image = build_report_image(
        source_images,
        label_map,
        structures,
        measurements,
        findings,
        title="Hippocampus volumetry",
        model_name="hippocampus-unet",
        model_version="1.2.0",
        method=METHOD,
        identity=identity,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        series_number=903,
        series_description="Hippocampus report",
    )
    path = tmp_path / "sc.dcm"
    image.save_as(path)
    pixels = pydicom.dcmread(path).pixel_array
    Image.fromarray(pixels).save(artifacts_dir / "report_hippocampus.png")

    assert dciodvfy(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert pixels.shape == (ds.Rows, ds.Columns, 3) and ds.Columns == 1024
    assert ds.StudyDescription == source_images[0].StudyDescription
    assert ds.AccessionNumber == source_images[0].AccessionNumber
    assert ds.StudyInstanceUID == source_images[0].StudyInstanceUID
    assert (ds.SeriesNumber, ds.SeriesDescription) == (903, "Hippocampus report")
    assert ds.BurnedInAnnotation == "YES"
    assert list(ds.PatientOrientation) == ["L", "P"]
    assert ds.Manufacturer == "dicom-node"
    key_slices = choose_key_slices(label_map, structures, len(source_images))
    assert [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence] == [
        source_images[k].SOPInstanceUID for k in key_slices
    ]
    for structure in structures:
        assert _has_colour(pixels, structure.colour_rgb), structure.name


def test_key_slices_are_where_structures_are_largest(
    label_map: np.ndarray, structures: tuple[Structure, ...]
) -> None:
    chosen = choose_key_slices(label_map, structures, label_map.shape[0])
    areas = [(label_map == s.label).sum(axis=(1, 2)) for s in structures]
    assert 2 <= len(chosen) <= 3 and chosen == sorted(chosen)
    for area in areas:
        assert int(np.argmax(area)) in chosen
    assert choose_key_slices(np.zeros_like(label_map), structures, label_map.shape[0]) == [
        label_map.shape[0] // 2
    ]
    assert choose_key_slices(None, (), 32) == [16]


def test_generic_layout_many_structures_coronal_ct(
    artifacts_dir: Path, identity: Identity
) -> None:
    phantom, _ = asymmetric_phantom((40, 48, 36))
    series = series_from_ras_volume(
        phantom - 1000.0,
        (1.0, 1.0, 2.0),
        modality="CT",
        orientation="coronal",
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        series_description="Synthetic coronal CT",
        series_number=3,
    )
    normal = np.cross(*np.array(series[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    series.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float))))
    volume = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in series])
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[np.isclose(volume, -600.0)] = 1
    labels[np.isclose(volume, -750.0)] = 2
    structures = tuple(
        Structure(label, name, ANATOMICAL_STRUCTURE, HIPPOCAMPUS, colour)
        for label, name, colour in (
            (1, "bright blob", (240, 80, 80)),
            (2, "dim blob", (80, 200, 120)),
            (3, "absent structure", (250, 210, 60)),
            (4, "another absent structure with a long name", (180, 110, 240)),
        )
    )
    volumes = tuple(
        Measurement(
            f"{s.name} volume",
            VOLUME,
            float((labels == s.label).sum()) * 2.0,
            CUBIC_MILLIMETRE,
            s.label,
        )
        for s in structures
    )
    density = Measurement(
        "mean density",
        ("112031", "DCM", "Attenuation Coefficient"),
        -612.5,
        ("[hnsf'U]", "UCUM", "Hounsfield unit"),
        1,
    )
    measurements = (*volumes, density)
    assert (labels == 1).any() and (labels == 2).any()

    pixels = render_report_png(
        series,
        labels,
        structures,
        measurements,
        title="Phantom check",
        model_name="phantom-model",
        model_version="0.0.1",
        method="thresholds on a synthetic phantom",
        identity=identity,
    )
    Image.fromarray(pixels).save(artifacts_dir / "report_coronal_ct.png")

    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[1:] == (1024, 3)
    assert _has_colour(pixels, structures[0].colour_rgb)
    assert _has_colour(pixels, structures[1].colour_rgb)


def test_classification_only_report(
    tmp_path: Path,
    artifacts_dir: Path,
    source_images: list[Dataset],
    findings: tuple[Finding, ...],
    identity: Identity,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    more = (
        *findings,
        Finding(
            "scan quality",
            ("404684003", "SCT", "Finding"),
            "diagnostic",
            {"diagnostic": 0.964, "limited": 0.036},
        ),
    )
    image = build_report_image(
        source_images,
        None,
        (),
        (),
        more,
        title="Hippocampal atrophy screening",
        model_name="atrophy-classifier",
        model_version="0.3",
        method="2.5D CNN classifier on the hippocampus crop",
        identity=identity,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        series_number=904,
        series_description="Atrophy screening report",
    )
    path = tmp_path / "sc-classification.dcm"
    image.save_as(path)
    Image.fromarray(image.pixel_array).save(artifacts_dir / "report_classification.png")

    assert dciodvfy(path) == []
    assert len(image.SourceImageSequence) == 1


def test_bad_inputs_are_rejected(
    source_images: list[Dataset],
    label_map: np.ndarray,
    structures: tuple[Structure, ...],
    identity: Identity,
) -> None:
    def render(labels: np.ndarray, key_slices: list[int] | None = None) -> np.ndarray:
        return render_report_png(
            source_images,
            labels,
            structures,
            (),
            key_slices=key_slices,
            title="t",
            model_name="m",
            model_version="1",
            method="x",
            identity=identity,
        )

    with pytest.raises(ValueError, match="does not match"):
        render(label_map[:, :-1])
    with pytest.raises(ValueError, match="out of range"):
        render(label_map, [40])


def test_value_formatting() -> None:
    assert format_value(1234.4) == "1,234"
    assert format_value(12.34) == "12.3"
    assert format_value(0.834) == "0.83"
