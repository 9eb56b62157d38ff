"""The gaussian-blur task through the pipeline: numpy filter equals scipy's, derived series read back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from dicom_node.config import SeriesNumbers
from dicom_node.run.pipeline import JobSpec, run_job
from inference.blur.filter import gaussian_blur, sigma_voxels
from inference.blur.task import GaussianBlurTask
from inference.volume import load_series_files
from tests.conftest import HIPPO_CROP_STUDY1, SHARED_DATA
from tests.factories import series_from_nifti, write_datasets

CT = SHARED_DATA / "ct-abdomen" / "example_ct.nii.gz"


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A real abdominal CT as an axial DICOM series (anisotropic spacing, rescale intercept)."""
    datasets = series_from_nifti(CT, modality="CT", series_description="CT abdomen", seed=3,
                                 rescale_slope=1.0, rescale_intercept=-1024.0)
    return write_datasets(datasets, tmp_path_factory.mktemp("ct"))


def spec_for(paths: list[Path], out: Path, options: dict[str, object]) -> JobSpec:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    out.mkdir(parents=True, exist_ok=True)
    return JobSpec(job_uid="blur-job", study_uid=str(ds.StudyInstanceUID),
                   series_uid=str(ds.SeriesInstanceUID), analysis="gaussian-blur",
                   paths=tuple(map(str, paths)), result_dir=str(out),
                   series_numbers=SeriesNumbers(derived=777), options=dict(options))


@pytest.mark.parametrize("mode", ["reflect", "nearest", "mirror", "constant", "wrap"])
def test_numpy_blur_equals_scipy_on_real_ct(ct_series: list[Path], mode: str) -> None:
    volume = load_series_files(ct_series)
    sigmas = sigma_voxels((3.0, 2.0, 2.0), volume.spacing_mm)
    assert len(set(sigmas)) > 1  # the CT is anisotropic: sigmas differ per axis
    ours = gaussian_blur(volume.array, sigmas, truncate=3.0, mode=mode)
    reference = ndimage.gaussian_filter(volume.array.astype(np.float64), sigmas, truncate=3.0, mode=mode)
    assert ours.shape == volume.array.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9 * float(np.abs(reference).max()))


def test_blur_job_files_a_derived_series_with_source_geometry(
    tmp_path: Path, dciodvfy: Callable[[Path], list[str]]
) -> None:
    sources = sorted(HIPPO_CROP_STUDY1.glob("*.dcm"))
    task = GaussianBlurTask()
    options = task.validate_options({"sigma_mm": 1.5})
    outcome = run_job(spec_for(sources, tmp_path / "a", options), task)
    source = load_series_files(sources)
    derived = load_series_files([Path(f) for f in outcome.files if f.endswith(".dcm")])
    assert len(outcome.files) == len(sources)  # one image per slice (result.json beside them)
    np.testing.assert_allclose(derived.affine, source.affine)
    assert derived.shape == source.shape
    reference = ndimage.gaussian_filter(source.array.astype(np.float64),
                                        sigma_voxels([1.5] * 3, source.spacing_mm), truncate=4.0)
    first = pydicom.dcmread(outcome.files[0])
    slope = float(first.get("RescaleSlope", 1.0))
    assert np.abs(derived.array - reference).max() <= slope / 2 + 1e-4  # stored values are rounded
    assert np.abs(derived.array - source.array).max() > 1  # and it did blur
    template = pydicom.dcmread(sources[0])
    assert first.SeriesInstanceUID not in {template.SeriesInstanceUID, ""}
    assert first.StudyInstanceUID == template.StudyInstanceUID
    assert first.StudyDescription == template.StudyDescription
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert first.SeriesNumber == 777 and first.Manufacturer == "dicom-node"
    assert "Gaussian blur sigma 1.5 mm" in first.SeriesDescription
    assert "sigma 1.5 mm" in first.DerivationDescription
    assert first.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    # the derived image adds no IOD error to those of its source (this one lacks MR attributes)
    assert set(dciodvfy(Path(outcome.files[0]))) <= set(dciodvfy(sources[0])) - {
        "Error - Missing attribute Type 2 Required Element=<PatientBirthDate> Module=<Patient>",
        "Error - Missing attribute Type 2 Required Element=<PatientSex> Module=<Patient>"}
    summary = outcome.summary["derived_series"]
    assert summary["series_instance_uid"] == first.SeriesInstanceUID
    # a retry files the same UIDs; other options a series of its own
    again = run_job(spec_for(sources, tmp_path / "b", options), task)
    assert again.summary["derived_series"] == summary
    other = run_job(spec_for(sources, tmp_path / "c", task.validate_options({"sigma_mm": 3})), task)
    assert other.summary["derived_series"]["series_instance_uid"] != summary["series_instance_uid"]


@pytest.mark.parametrize(
    ("options", "field"),
    [({"sigma_mm": -1}, "sigma_mm"), ({"sigma_mm": [1, 2]}, "sigma_mm"), ({"mode": "bogus"}, "mode"),
     ({"truncate": 0}, "truncate"), ({"radius": 3}, "radius")],
)
def test_bad_options_name_the_option(options: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        GaussianBlurTask().validate_options(options)
