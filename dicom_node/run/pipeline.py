"""The pipeline step, from a series' files to result objects: load, infer, report. The only place inference meets reports."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node import __version__
from dicom_node.config import NodeSettings, ResultKind, SeriesNumbers
from dicom_node.errors import InferenceFailed, StudyNotProcessable
from dicom_node.receive.spool import write_atomic
from dicom_node.run.priors import PriorSources, find_prior_results
from dicom_node.uids import result_uid, result_uids
from inference.base import Analysis, AnalysisResult, ConfigurableAnalysis
from inference.errors import InputError
from inference.volume import Volume, load_series
from reports.comparison import Comparison, compare, measurement_key
from reports.derived import build_derived_series
from reports.identity import Identity
from reports.normal_range import percentile_statement
from reports.protocols import PriorLike
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
    node_name: str = NodeSettings().ae_title
    options: dict[str, Any] = field(default_factory=dict)
    priors: PriorSources | None = None


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


def _read(path: Path | str, *, decode: bool = False) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise StudyNotProcessable(f"{Path(path).name} is not readable DICOM: {exc}") from exc
    if decode:
        try:
            _ = ds.pixel_array  # pydicom keeps the decoded array for the volume to use
        except (AttributeError, NotImplementedError, RuntimeError, ValueError, TypeError):
            pass  # building the volume decodes it again and says why it cannot
    return ds


def read_datasets(paths: Sequence[Path | str], *, threads: int = 1) -> list[Dataset]:
    """Read a series' instances.

    Parameters
    ----------
    paths
        The instance files.
    threads
        With more than one, files are read, and their pixel data decoded, in that many threads.

    Returns
    -------
    list[pydicom.dataset.Dataset]
        One dataset per path, in the order of ``paths``.

    Raises
    ------
    StudyNotProcessable
        Naming the first file that is not readable DICOM.
    """
    if threads <= 1:
        return [_read(path) for path in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda path: _read(path, decode=True), paths))


def order_like_volume(datasets: Sequence[Dataset], volume: Volume) -> list[Dataset]:
    """Return ``datasets`` in the volume's slice order (frame k of a SEG refers to image k)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    return [by_uid[uid] for uid in volume.sop_instance_uids]


@dataclass(frozen=True, eq=False)
class LoadedSeries:
    """A series ready to analyse: its volume, and its datasets in the volume's slice order."""

    volume: Volume
    sources: tuple[Dataset, ...]


def load_sources(paths: Sequence[Path | str], *, threads: int = 1) -> LoadedSeries:
    """Read the files of one series and build its volume: the load step.

    The reports need the whole source datasets (the SC page draws their pixels), so the
    datasets are read once, with pixel data, and the volume is built from them; the header-
    then-pixels reader :func:`inference.volume.load_series_files` would read every file twice.

    Parameters
    ----------
    paths
        The instance files of one series, in any order.
    threads
        Threads reading the files (see :func:`read_datasets`).

    Returns
    -------
    LoadedSeries
        The volume and the sources in its slice order.

    Raises
    ------
    StudyNotProcessable
        A file is not readable DICOM, or the images do not form a volume (the reason says why).
    """
    datasets = read_datasets(paths, threads=threads)
    try:
        volume = load_series(datasets)
    except InputError as exc:
        raise StudyNotProcessable(str(exc)) from exc
    return LoadedSeries(volume, tuple(order_like_volume(datasets, volume)))


def derive_result_uids(
    study_uid: str,
    series_uid: str,
    analysis: str,
    result: AnalysisResult,
    n_images: int,
    options: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Return every UID the results of one analysis of one series get.

    (study, series, analysis, model version) as :func:`dicom_node.uids.result_uids`; options
    that change the result join the version, so a retry files the same UIDs while a run with
    other options files a series of its own.

    Parameters
    ----------
    study_uid, series_uid
        The analysed series and its study.
    analysis
        The analysis' configured name.
    result
        Its result (model version; whether it has a derived image).
    n_images
        The number of source images (one derived image each).
    options
        The options the analysis ran with.

    Returns
    -------
    dict[str, str]
        As :func:`dicom_node.uids.result_uids`, plus ``derived_series`` and
        ``derived_instance_<k>`` for a derived image.
    """
    version = result.model_version
    if options:
        version += "|" + json.dumps(options, sort_keys=True, separators=(",", ":"))
    uids = result_uids(study_uid, series_uid, analysis, version)
    if result.derived_image is not None:
        base = (study_uid, series_uid, analysis, version)
        uids["derived_series"] = result_uid(*base, "derived-series")
        for index in range(n_images):
            uids[f"derived_instance_{index}"] = result_uid(*base, "derived-instance", str(index))
    return uids


def job_uids(spec: JobSpec, result: AnalysisResult, n_images: int) -> dict[str, str]:
    """Return every UID a job's results get, derived from what identifies the job (:func:`derive_result_uids`)."""
    return derive_result_uids(spec.study_uid, spec.series_uid, spec.analysis, result, n_images, spec.options)


def run_analysis(
    analysis: Analysis,
    volume: Volume,
    options: dict[str, Any] | None = None,
    *,
    name: str | None = None,
) -> AnalysisResult:
    """Run an analysis on a volume, with options when there are any: the infer step.

    Parameters
    ----------
    analysis
        A loaded analysis.
    volume
        The series to analyse.
    options
        Options of this run, for an analysis that takes them.
    name
        The analysis' configured name, for the log (default: its own name).

    Returns
    -------
    inference.base.AnalysisResult
        What the analysis found.

    Raises
    ------
    StudyNotProcessable
        If options are given to an analysis that takes none, or the input is unsuitable.
    InferenceFailed
        If the analysis raised an unexpected error.
    """
    try:
        if not options:
            return analysis.run(volume)
        if not isinstance(analysis, ConfigurableAnalysis):
            raise InputError(f"{analysis.name} takes no options")
        return analysis.run_with_options(volume, options)
    except InputError as exc:
        raise StudyNotProcessable(str(exc)) from exc
    except Exception as exc:  # a model bug must fail the job, not the worker
        logger.exception("analysis %s failed on series %s", name or analysis.name, volume.series_instance_uid)
        raise InferenceFailed(f"{type(exc).__name__}: {exc}") from exc


def result_summary(
    result: AnalysisResult, spec: JobSpec, uids: dict[str, str], source: Dataset | None = None,
    comparison: Comparison | None = None,
) -> dict[str, Any]:
    """Return the JSON result of a job: what was measured, on what, by which model.

    With the analysed ``source`` image, the patient ID and study date are kept too, so the
    result can serve as the prior of the patient's next study; with a ``comparison``, the
    change since the prior study.
    """
    names = {s.label: s.name for s in result.structures}
    return {
        **({"patient_id": str(source.get("PatientID", "")), "study_date": str(source.get("StudyDate", ""))}
           if source is not None else {}),
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
                "key": measurement_key(m, result.structures),
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
        **({"quality": {**asdict(result.quality), "reasons": list(result.quality.reasons)}}
           if result.quality is not None else {}),
        **({"comparison": comparison_summary(comparison)} if comparison is not None else {}),
        **(side_summary(result, source) if result.side is not None else {}),
    }


def side_summary(result: AnalysisResult, source: Dataset | None) -> dict[str, Any]:
    """The side, why it is unknown, and (with the source image) the normal-range statement."""
    summary: dict[str, Any] = {"side": result.side, "side_reason": result.side_reason}
    if source is not None and result.side is not None:
        summary["normal_range"] = percentile_statement(source, result.side, result.side_reason)
    return summary


def side_notes(result: AnalysisResult, source: Dataset) -> list[str]:
    """The side and the normal-range statement of a result about one side, else nothing."""
    if result.side is None:
        return []
    side = f"Side: {result.side} (from the series' position relative to the midline)" \
        if result.side != "unknown" else f"Side unknown: {result.side_reason}"
    return [side, percentile_statement(source, result.side, result.side_reason)]


def comparison_summary(comparison: Comparison) -> dict[str, Any]:
    """The change since the prior study as JSON (``{"prior": None}`` when none was found)."""
    prior = comparison.prior
    if prior is None:
        return {"prior": None, "message": "no prior study found"}
    return {
        "prior": {"study_instance_uid": prior.study_instance_uid, "study_date": prior.study_date,
                  "model_name": prior.model_name, "model_version": prior.model_version,
                  "sr_sop_instance_uid": prior.sr_sop_instance_uid, "origin": prior.origin},
        "other_model": comparison.other_model,
        "interval_days": comparison.interval_days,
        "changes": [
            {"name": c.name, "key": c.key, "unit": c.unit, "prior": c.prior, "current": c.current,
             "change": round(c.change, 3),
             "percent": None if c.percent is None else round(c.percent, 3),
             "percent_per_year": None if (r := comparison.percent_per_year(c)) is None else round(r, 3)}
            for c in comparison.changes
        ],
        "history": [{"study_date": d.strftime("%Y%m%d"), "values": dict(v)} for d, v in comparison.history],
    }


@dataclass(frozen=True)
class ResultObjects:
    """The objects of one result, by name (``seg``, ``sc``, ``sr``, ``derived-0001`` ...), and their UIDs."""

    objects: dict[str, Dataset]
    uids: dict[str, str]
    comparison: Comparison | None = None


def report_results(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    *,
    study_uid: str,
    series_uid: str,
    analysis: str,
    series_numbers: SeriesNumbers,
    node_name: str,
    options: dict[str, Any] | None = None,
    kinds: Collection[ResultKind] | None = None,
    priors: Sequence[PriorLike] | None = None,
) -> ResultObjects:
    """Build the result objects of one analysis of one series: the report step.

    Parameters
    ----------
    result
        What the analysis found.
    sources
        The analysed datasets, in the volume's slice order, with pixel data.
    study_uid, series_uid
        The analysed series and its study.
    analysis
        The analysis' configured name.
    series_numbers
        The configured series numbers of its objects.
    node_name
        The node's AE title (Device Serial Number of every object).
    options
        The options the analysis ran with.
    kinds
        Build only these of SEG, SC and SR (default: all that apply).
    priors
        The patient's prior results of this analysis, found by the node; ``None`` for an
        analysis that does not compare with priors (the reports then show no comparison),
        empty when none was found (they say so).

    Returns
    -------
    ResultObjects
        The objects (see :func:`build_results`) and every UID of the result.

    Raises
    ------
    StudyNotProcessable
        If the sources break the IODs the objects reference them by.
    """
    uids = derive_result_uids(study_uid, series_uid, analysis, result, len(sources), options)
    comparison = None
    if priors is not None and result.measurements:
        comparison = compare(result.measurements, result.structures, str(sources[0].get("StudyDate", "")),
                             result.model_name, result.model_version, priors)
    try:
        objects = build_results(result, sources, series_numbers, uids, identity_for(result, node_name),
                                kinds=kinds, comparison=comparison)
    except ValueError as exc:  # highdicom refuses sources that break their IOD
        raise StudyNotProcessable(f"results cannot reference this series: {exc}") from exc
    return ResultObjects(objects, uids, comparison)


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
        loaded = load_sources(spec.paths)
    with _timed(outcome.timings, "infer"):
        result = run_analysis(analysis, loaded.volume, spec.options, name=spec.analysis)
    with _timed(outcome.timings, "report"):
        priors = None
        if spec.priors is not None and getattr(analysis, "uses_prior_results", False):
            priors = find_prior_results(spec.priors, spec.analysis, result.model_name,
                                        str(loaded.sources[0].get("PatientID", "")), spec.study_uid)
        built = report_results(
            result, loaded.sources, study_uid=spec.study_uid, series_uid=spec.series_uid,
            analysis=spec.analysis, series_numbers=spec.series_numbers, node_name=spec.node_name,
            options=spec.options, priors=priors,
        )
        out = Path(spec.result_dir)
        for name, ds in built.objects.items():
            path = out / f"{name}.dcm"
            ds.save_as(path, enforce_file_format=True)
            outcome.files.append(str(path))
        outcome.summary = result_summary(result, spec, built.uids, loaded.sources[0], built.comparison)
        write_atomic(out / "result.json", json.dumps(outcome.summary, indent=2).encode())
    return outcome


def build_results(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    numbers: SeriesNumbers,
    uids: dict[str, str],
    identity: Identity,
    *,
    kinds: Collection[ResultKind] | None = None,
    comparison: Comparison | None = None,
) -> dict[str, Dataset]:
    """Build the objects of a result.

    A derived image becomes a derived series (``derived-0001`` ...); a label map a SEG;
    measurements, findings or structures an SC report and an SR. A result with only a
    derived image (a processing task) files only the derived series.

    Parameters
    ----------
    result
        What the analysis found.
    sources
        The analysed datasets, in the volume's slice order, with pixel data.
    numbers
        Series numbers of the objects.
    uids
        As :func:`derive_result_uids` returns them.
    identity
        Equipment and algorithm identification.
    kinds
        Build only these of SEG, SC and SR (default: all that apply); a derived series is
        always built.
    comparison
        The change since the prior study, shown in the SC and carried by the SR.

    Returns
    -------
    dict[str, pydicom.dataset.Dataset]
        The objects by name, in the order they are filed: derived images, ``seg``, ``sc``, ``sr``.

    Raises
    ------
    ValueError
        If the result does not fit the sources, or the sources break an IOD.
    """
    wanted = frozenset(kinds) if kinds is not None else frozenset(("seg", "sc", "sr"))
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
    if label_map is not None and result.structures and wanted & {"seg", "sr"}:
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
        if "seg" in wanted:
            objects["seg"] = seg
    if "sc" in wanted:
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
            quality=result.quality,
            comparison=comparison,
            notes=side_notes(result, sources[0]),
        )
    if "sr" in wanted:
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
            quality=result.quality,
            comparison=comparison,
        )
    return objects
