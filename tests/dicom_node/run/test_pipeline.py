"""One job from source files to result objects, on real data with explicit geometry."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.config import SeriesNumbers
from dicom_node.errors import StudyNotProcessable
from dicom_node.run.pipeline import JobSpec, run_job
from inference.hippocampus.analysis import HippocampusAnalysis
from inference.volume import load_series
from reports.preview import _ALERT
from tests.conftest import HIPPO_CROP_STUDY1, SHARED_DATA, sr_content_items
from tests.factories import series_from_nifti, write_datasets

MSD = SHARED_DATA / "hippocampus-msd"


@pytest.fixture(scope="module")
def analysis() -> HippocampusAnalysis:
    loaded = HippocampusAnalysis()
    loaded.load("cpu")
    return loaded


def held_out_cases(analysis: HippocampusAnalysis, count: int) -> list[str]:
    split = analysis._meta["split"]
    assert len(split) >= count
    return list(split[:count])


def spec_for(paths: list[Path], out: Path) -> JobSpec:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    out.mkdir(parents=True, exist_ok=True)
    return JobSpec(
        job_uid="test-job", study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        analysis="hippocampus", paths=tuple(map(str, paths)), result_dir=str(out),
        series_numbers=SeriesNumbers(seg=301, sc=302, sr=303),
    )


def seg_label_map(seg_path: Path, source_uids: tuple[str, ...]) -> np.ndarray:
    seg = hd.seg.segread(seg_path)
    return np.asarray(seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_uids), combine_segments=True,
        assert_missing_frames_are_empty=True,
    ), dtype=np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b)))


@pytest.mark.parametrize("orientation", ["sagittal", "coronal", "axial"])
def test_msd_case_as_dicom_gets_its_reference_labels_back(
    tmp_path: Path, analysis: HippocampusAnalysis, orientation: str
) -> None:
    """An MSD case written as a DICOM series in LPS, any acquisition plane, file order shuffled:
    the SEG the node files carries the reference labels, anterior still anterior."""
    case = held_out_cases(analysis, 1)[0]
    image = series_from_nifti(MSD / "images" / f"{case}.nii.gz", orientation=orientation,
                              series_description="HippoCrop", seed=1)
    labels = series_from_nifti(MSD / "labels" / f"{case}.nii.gz", orientation=orientation,
                               series_description="labels", seed=2)
    paths = write_datasets(image, tmp_path / "series")
    outcome = run_job(spec_for(paths, tmp_path / "out"), analysis)
    volume = load_series(image)
    reference = load_series(labels).array.astype(np.uint8)
    predicted = seg_label_map(tmp_path / "out" / "seg.dcm", volume.sop_instance_uids)
    assert predicted.shape == reference.shape
    for label in (1, 2):
        assert dice(predicted == label, reference == label) > 0.8, f"label {label}"
    # anterior is anterior in patient space: LPS y grows towards posterior
    centroids = {}
    for label in (1, 2):
        index = np.argwhere(predicted == label).mean(axis=0)
        centroids[label] = (volume.affine @ np.append(index, 1.0))[:3]
    assert centroids[1][1] < centroids[2][1] - 5.0
    # volumes in mm³ use the true voxel spacing
    voxel_mm3 = float(np.prod(volume.spacing_mm))
    expected = {
        "Hippocampus anterior": np.count_nonzero(predicted == 1) * voxel_mm3,
        "Hippocampus posterior": np.count_nonzero(predicted == 2) * voxel_mm3,
    }
    measured = {m["structure"]: m["value"] for m in outcome.summary["measurements"] if m["structure"]}
    assert measured == pytest.approx(expected)
    assert all(m["unit"] == "mm3" for m in outcome.summary["measurements"])


def test_results_pass_dciodvfy_and_read_back(
    tmp_path: Path, analysis: HippocampusAnalysis, dciodvfy: Callable[[Path], list[str]]
) -> None:
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    outcome = run_job(spec_for(paths, tmp_path), analysis)
    names = sorted(Path(f).name for f in outcome.files)
    assert names == ["sc.dcm", "seg.dcm", "sr.dcm"]
    for name in names:
        assert dciodvfy(tmp_path / name) == [], name
    source = pydicom.dcmread(paths[0])
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    for obj, number in ((seg, 301), (sc, 302), (sr, 303)):
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.StudyDescription == source.StudyDescription
        assert obj.PatientID == source.PatientID
        assert obj.SeriesNumber == number
        assert obj.Manufacturer == "dicom-node"
    # model name and version in every object
    version = analysis.model_version
    for segment in seg.SegmentSequence:
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hippocampus-unet3d", version)
    assert f"hippocampus-unet3d {version}" in sc.DerivationDescription
    text_values = [item.get("TextValue") for item in sr_content_items(sr.ContentSequence)]
    assert "hippocampus-unet3d" in text_values and version in text_values
    # three volumes in mm3, the total their sum
    volumes = outcome.summary["measurements"]
    assert [m["unit"] for m in volumes] == ["mm3"] * 3
    assert volumes[2]["value"] == pytest.approx(volumes[0]["value"] + volumes[1]["value"], abs=0.01)
    measured = [
        item for item in sr_content_items(sr.ContentSequence)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    assert len(measured) == 3
    assert {m.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for m in measured} == {"mm3"}



def test_rerun_gives_identical_uids(tmp_path: Path, analysis: HippocampusAnalysis) -> None:
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    first = run_job(spec_for(paths, tmp_path / "a"), analysis)
    second = run_job(spec_for(paths, tmp_path / "b"), analysis)
    assert first.summary["result_uids"] == second.summary["result_uids"]
    for name in ("seg.dcm", "sc.dcm", "sr.dcm"):
        a, b = (pydicom.dcmread(tmp_path / d / name) for d in ("a", "b"))
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_unreadable_file_fails_the_job_with_its_name(tmp_path: Path, analysis: HippocampusAnalysis) -> None:
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))[:3]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 10)
    spec = spec_for(paths, tmp_path / "out")
    spec = JobSpec(**{**spec.__dict__, "paths": (*spec.paths, str(broken))})
    with pytest.raises(StudyNotProcessable, match="broken.dcm is not readable DICOM"):
        run_job(spec, analysis)


def test_low_confidence_is_shown_in_the_sc_and_recorded_in_the_sr(
    tmp_path: Path, analysis: HippocampusAnalysis, dciodvfy: Callable[[Path], list[str]]
) -> None:
    """A shuffled HippoCrop: red band and Image Comments in the SC, DCM 111236 in the SR."""
    datasets = [pydicom.dcmread(p) for p in sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))]
    stack = np.stack([ds.pixel_array for ds in datasets])
    shuffled = stack.ravel().copy()
    np.random.default_rng(0).shuffle(shuffled)
    for ds, pixels in zip(datasets, shuffled.reshape(stack.shape), strict=True):
        ds.PixelData = np.ascontiguousarray(pixels, dtype=stack.dtype).tobytes()
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for k, ds in enumerate(datasets):
        paths.append(folder / f"{k:03d}.dcm")
        ds.save_as(paths[-1])
    outcome = run_job(spec_for(paths, tmp_path / "out"), analysis)
    quality = outcome.summary["quality"]
    assert quality["low_confidence"] is True and quality["reasons"]
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["quality"] == quality
    for name in ("sc.dcm", "sr.dcm"):
        assert dciodvfy(tmp_path / "out" / name) == [], name
    sc = pydicom.dcmread(tmp_path / "out" / "sc.dcm")
    assert sc.ImageComments.startswith("LOW CONFIDENCE: ")
    alert = np.all(sc.pixel_array == np.array(_ALERT, dtype=np.uint8), axis=-1)
    assert alert[:400].all(axis=1).sum() >= 40  # a full-width red band near the top
    rating = quality_rating(tmp_path / "out" / "sr.dcm")
    assert rating == "111236"


def test_normal_result_records_meeting_the_quality_standard(tmp_path: Path, analysis: HippocampusAnalysis) -> None:
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    outcome = run_job(spec_for(paths, tmp_path), analysis)
    assert outcome.summary["quality"]["low_confidence"] is False
    assert quality_rating(tmp_path / "sr.dcm") == "111237"
    sc = pydicom.dcmread(tmp_path / "sc.dcm")
    assert "ImageComments" not in sc
    assert not np.all(sc.pixel_array == np.array(_ALERT, dtype=np.uint8), axis=-1).all(axis=1).any()


def quality_rating(sr_path: Path) -> str:
    """The value of the SR's "Analysis Quality Rating" (DCM 111693) evaluation."""
    sr = pydicom.dcmread(sr_path)
    (item,) = [
        item for item in sr_content_items(sr.ContentSequence)
        if item.get("ValueType") == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "111693"
    ]
    return str(item.ConceptCodeSequence[0].CodeValue)


def test_side_and_normal_range_statement_in_the_result(tmp_path: Path, analysis: HippocampusAnalysis) -> None:
    paths = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    summary = run_job(spec_for(paths, tmp_path), analysis).summary
    assert summary["side"] == "unknown" and "placeholder coordinates" in summary["side_reason"]
    assert summary["normal_range"].startswith("No percentile: no published normative data")
    assert "side (the series' first voxel lies at x = 0, y = 0 mm" in summary["normal_range"]
