"""One job from source files to result files: load, infer, report. The only place inference meets reports."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node import __version__
from dicom_node.config import SeriesNumbers
from dicom_node.errors import InferenceFailed, StudyNotProcessable
from dicom_node.receive.spool import write_atomic
from dicom_node.uids import result_uid, result_uids
from inference.base import Analysis, AnalysisResult, ConfigurableAnalysis, InputError
from inference.volume import Volume, load_series
from reports.derived import build_derived_series
from reports.identity import Identity
from reports.sc import build_report_image
from reports.seg import build_segmentation
from reports.sr import build_measurement_report

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run a job; only IDs and paths, so it crosses processes."""

    job_uid: str
    study_uid: str
    series_uid: str
    analysis: str
    paths: tuple[str, ...]
    result_dir: str
    series_numbers: SeriesNumbers
    node_name: str = "DICOMNODE"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobOutcome:
    """What a worker reports back: result files, a JSON summary and stage timings."""

    files: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - start, 4)


#: The procedure an analysis report describes (TID 1500 "Procedure reported"): imaging.
IMAGING_PROCEDURE = ("363679005", "SCT", "Imaging")


def identity_for(result: AnalysisResult, node_name: str) -> Identity:
    """Return the equipment and algorithm identification of one result.

    ``node_name`` (the node's AE title) is the Device Serial Number, so results say which
    installation made them.
    """
    return Identity(
        manufacturer_model_name="dicom-node",
        software_versions=__version__,
        device_serial_number=node_name,
        algorithm_name=result.model_name,
        algorithm_version=result.model_version,
    )


def read_datasets(paths: Sequence[Path | str]) -> list[Dataset]:
    """Read a series' instances.

    Raises
    ------
    StudyNotProcessable
        Naming the first file that is not readable DICOM.
    """
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise StudyNotProcessable(f"{Path(path).name} is not readable DICOM: {exc}") from exc
    return datasets


def order_like_volume(datasets: Sequence[Dataset], volume: Volume) -> list[Dataset]:
    """Return ``datasets`` in the volume's slice order (frame k of a SEG refers to image k)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    return [by_uid[uid] for uid in volume.sop_instance_uids]


def job_uids(spec: JobSpec, result: AnalysisResult, n_images: int) -> dict[str, str]:
    """Return every UID a job's results get, derived from what identifies the job.

    (study, series, analysis, model version) as :func:`dicom_node.uids.result_uids`; options
    that change the result (a blur's sigma) join the version, so a retry files the same
    UIDs while a job with other options files a series of its own.
    """
    version = result.model_version
    if spec.options:
        version += "|" + json.dumps(spec.options, sort_keys=True, separators=(",", ":"))
    uids = result_uids(spec.study_uid, spec.series_uid, spec.analysis, version)
    if result.derived_image is not None:
        base = (spec.study_uid, spec.series_uid, spec.analysis, version)
        uids["derived_series"] = result_uid(*base, "derived-series")
        for index in range(n_images):
            uids[f"derived_instance_{index}"] = result_uid(*base, "derived-instance", str(index))
    return uids


def run_analysis(analysis: Analysis, volume: Volume, options: dict[str, Any]) -> AnalysisResult:
    """Run an analysis, with the job's options when it has any.

    Raises
    ------
    InputError
        If options are given to an analysis that takes none, or the input is unsuitable.
    """
    if not options:
        return analysis.run(volume)
    if not isinstance(analysis, ConfigurableAnalysis):
        raise InputError(f"{analysis.name} takes no options")
    return analysis.run_with_options(volume, options)


def result_summary(result: AnalysisResult, spec: JobSpec, uids: dict[str, str]) -> dict[str, Any]:
    """Return the JSON result of a job: what was measured, on what, by which model."""
    names = {s.label: s.name for s in result.structures}
    return {
        "job_uid": spec.job_uid,
        "analysis": result.analysis,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "method": result.method,
        "study_instance_uid": spec.study_uid,
        "series_instance_uid": spec.series_uid,
        "measurements": [
            {
                "name": m.name,
                "structure": names.get(m.structure_label) if m.structure_label else None,
                "value": round(float(m.value), 3),
                "unit": m.unit[0],
            }
            for m in result.measurements
        ],
        "findings": [asdict(f) for f in result.findings],
        "result_uids": {k: v for k, v in uids.items() if not k.startswith("derived_instance_")},
        **({"options": spec.options} if spec.options else {}),
        **({"derived_series": {
            "series_instance_uid": uids["derived_series"],
            "sop_instance_uids": [uids[f"derived_instance_{k}"] for k in range(len(result.derived_image))],
            "description": result.derived_description,
        }} if result.derived_image is not None else {}),
        **({"details": result.summary} if result.summary else {}),
    }


def run_job(spec: JobSpec, analysis: Analysis) -> JobOutcome:
    """Run one analysis on one series and write its result objects.

    Returns
    -------
    JobOutcome
        The result files (DICOM objects to send, then ``result.json``), the summary and
        the timings of the ``load``, ``infer`` and ``report`` stages.

    Raises
    ------
    StudyNotProcessable
        The input cannot be analysed; the reason says why.
    InferenceFailed
        The analysis raised an unexpected error.
    """
    outcome = JobOutcome()
    with _timed(outcome.timings, "load"):
        datasets = read_datasets(spec.paths)
        try:
            volume = load_series(datasets)
        except InputError as exc:
            raise StudyNotProcessable(str(exc)) from exc
        sources = order_like_volume(datasets, volume)
    with _timed(outcome.timings, "infer"):
        try:
            result = run_analysis(analysis, volume, spec.options)
        except InputError as exc:
            raise StudyNotProcessable(str(exc)) from exc
        except Exception as exc:  # a model bug must fail the job, not the worker
            logger.exception("analysis %s failed on series %s", spec.analysis, spec.series_uid)
            raise InferenceFailed(f"{type(exc).__name__}: {exc}") from exc
    with _timed(outcome.timings, "report"):
        uids = job_uids(spec, result, len(sources))
        try:
            objects = build_results(result, sources, spec, uids, identity_for(result, spec.node_name))
        except ValueError as exc:  # highdicom refuses sources that break their IOD
            raise StudyNotProcessable(f"results cannot reference this series: {exc}") from exc
        out = Path(spec.result_dir)
        for name, ds in objects.items():
            path = out / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            outcome.files.append(str(path))
        outcome.summary = result_summary(result, spec, uids)
        write_atomic(out / "result.json", json.dumps(outcome.summary, indent=2).encode())
    return outcome


def build_results(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    spec: JobSpec,
    uids: dict[str, str],
    identity: Identity,
) -> dict[str, Dataset]:
    """Build the objects of a result.

    A derived image becomes a derived series (``derived-0001`` ...); a label map a SEG;
    measurements, findings or structures an SC report and an SR. A result with only a
    derived image (a processing task) files only the derived series.
    """
    numbers = spec.series_numbers
    objects: dict[str, Dataset] = {}
    if result.derived_image is not None:
        images = build_derived_series(
            sources,
            np.asarray(result.derived_image, dtype=np.float64),
            series_instance_uid=uids["derived_series"],
            sop_instance_uids=[uids[f"derived_instance_{k}"] for k in range(len(sources))],
            series_number=numbers.derived,
            series_description=result.derived_description,
            derivation_description=f"{result.derived_description} ({result.method}); "
                                   f"{result.model_name} {result.model_version}",
            identity=identity,
        )
        objects.update({f"derived-{k + 1:04d}": ds for k, ds in enumerate(images)})
        if not (result.structures or result.measurements or result.findings):
            return objects
    label_map = result.label_map
    seg: Dataset | None = None
    if label_map is not None and result.structures:
        seg = build_segmentation(
            sources,
            np.asarray(label_map, dtype=np.uint8),
            result.structures,
            series_instance_uid=uids["seg_series"],
            sop_instance_uid=uids["seg_instance"],
            series_number=numbers.seg,
            series_description=f"{result.title} segmentation",
            identity=identity,
        )
        objects["seg"] = seg
    objects["sc"] = build_report_image(
        sources,
        label_map,
        result.structures,
        result.measurements,
        result.findings,
        key_slices=result.key_slices or None,
        title=result.title,
        model_name=result.model_name,
        model_version=result.model_version,
        method=result.method,
        identity=identity,
        series_instance_uid=uids["sc_series"],
        sop_instance_uid=uids["sc_instance"],
        series_number=numbers.sc,
        series_description=f"{result.title} report",
    )
    objects["sr"] = build_measurement_report(
        sources,
        result.structures,
        result.measurements,
        result.findings,
        segmentation=seg,
        label_map=None if seg is None else np.asarray(label_map, dtype=np.uint8),
        procedure_reported=IMAGING_PROCEDURE,
        tracking_seed=uids["tracking"],
        identity=identity,
        series_instance_uid=uids["sr_series"],
        sop_instance_uid=uids["sr_instance"],
        series_number=numbers.sr,
        series_description=f"{result.title} measurements",
    )
    return objects
