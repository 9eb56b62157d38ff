"""A worker's warm-up: every analysis run once on a synthetic series, its reports built, before it is ready."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicom_node.config import AnalysisSettings
from dicom_node.errors import DicomNodeError
from dicom_node.run.pipeline import JobSpec, run_job
from inference.base import Analysis, WarmUpInput, warm_up_input

logger = logging.getLogger(__name__)

#: Written into the synthetic series and its results, which never leave the worker.
WARM_UP_NAME = "dicom-node warm-up"


def synthetic_series(spec: WarmUpInput) -> list[Dataset]:
    """Return an axial single-frame series of ``spec``'s shape: ``spec.image``, or an ellipsoid over faint noise.

    The ellipsoid's values are those of soft tissue in a dark surrounding, so that analyses
    find something to segment and their reports have content. CT is stored with intercept
    -1024. Slices ascend towards the head, rows run anterior to posterior and columns right
    to left (ImageOrientationPatient [1, 0, 0, 0, 1, 0]), so ``spec.image`` is read as it is.
    """
    slices, rows, columns = spec.shape
    dz, dy, dx = spec.spacing_mm
    offset = 1024.0 if spec.modality == "CT" else 0.0
    if spec.image is not None:
        value = np.asarray(spec.image, dtype=np.float64) + offset
    else:
        grid = np.mgrid[0:slices, 0:rows, 0:columns].astype(np.float32)
        centre = np.array([(slices - 1) / 2, (rows - 1) / 2, (columns - 1) / 2], dtype=np.float32)
        radius = np.maximum(centre * 0.6, 1.0)
        inside = sum(((grid[i] - centre[i]) / radius[i]) ** 2 for i in range(3)) <= 1.0
        noise = np.random.default_rng(0).normal(0.0, 10.0, spec.shape)
        value = np.where(inside, 40.0 + offset if spec.modality == "CT" else 600.0,
                         -1000.0 + offset if spec.modality == "CT" else 20.0) + noise
    stored = np.clip(value, 0, 4095).astype("<u2")
    study_uid, series_uid, frame_uid = (generate_uid() for _ in range(3))
    sop_class = CTImageStorage if spec.modality == "CT" else MRImageStorage
    datasets = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Warm^Up", "WARMUP", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDescription = ds.SeriesDescription = spec.description
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = spec.modality, 1, k + 1
        ds.Manufacturer = WARM_UP_NAME
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition, ds.PositionReferenceIndicator = "HFS", ""
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, round(k * dz, 6)]
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = dz
        if spec.modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def warm_up(analysis: Analysis, name: str, settings: AnalysisSettings) -> dict[str, float] | None:
    """Run one analysis once on its synthetic input through the job path, reports included.

    The series is written to a temporary folder and analysed by :func:`run_job`, exactly as a
    received series is (read, volume, analysis, SEG/SC/SR written); everything is deleted
    afterwards and nothing is sent.

    Parameters
    ----------
    analysis
        A loaded analysis.
    name
        Its configured name (for the log).
    settings
        Its settings (series numbers of the results).

    Returns
    -------
    dict or None
        The stage timings (``load``, ``infer``, ``report``) with their total as ``warm_up``;
        ``None`` when the analysis asks for no warm-up, or the warm-up failed (logged: the
        worker still serves, and its first job of this analysis pays the cold start).
    """
    spec = warm_up_input(analysis)
    if spec is None:
        logger.info("warm-up of %s: the analysis asks for none", name)
        return None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dicom-node-warm-up-") as folder:
        work = Path(folder)
        (work / "results").mkdir()
        paths = []
        for index, dataset in enumerate(synthetic_series(spec)):
            path = work / f"{index:04d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        job = JobSpec(
            job_uid="warm-up", study_uid=str(dataset.StudyInstanceUID),
            series_uid=str(dataset.SeriesInstanceUID), analysis=name, paths=tuple(paths),
            result_dir=str(work / "results"), series_numbers=settings.series_numbers,
            node_name=WARM_UP_NAME, options={},
        )
        try:
            outcome = run_job(job, analysis)
        except DicomNodeError as exc:
            logger.warning("warm-up of %s on a synthetic %s series %s failed: %s; its first job"
                           " will pay the cold start", name, spec.modality, spec.shape, exc)
            return None
    timings = {**outcome.timings, "warm_up": round(time.perf_counter() - started, 4)}
    logger.info("warmed up %s on a synthetic %s series %s: %s", name, spec.modality, spec.shape,
                " ".join(f"{k}={v:.3f}s" for k, v in timings.items()))
    return timings
