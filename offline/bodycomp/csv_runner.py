"""The CSV batch runner: body composition on the study folders a CSV lists, with per-study results and summaries.

Outputs in RESULTS_DIR: ``json_files/{MRN}_{ACC}.json`` (everything about one study, errors
included), ``previews/{MRN}_{ACC}_{SeriesInstanceUID}_preview.png``, ``plots/..._slice_selection.png``
(the slice-selection output along z, each level in its configured colour), with a
segmentation range ``all_slices/{MRN}_{ACC}_{SeriesInstanceUID}/`` (image and mask of every
slice used), with ``dicom_seg`` ``dicom_seg/..._seg.dcm``, and ``run_log.csv``, ``summary.csv``,
``filtered_summary.csv`` rebuilt from every study's JSON at the end of each run.

``filtered_summary.csv`` keeps one row per study, after removing likely failures. A series is
removed when (rule names appear in the ``flags`` column of ``summary.csv``):

- ``failed``: the analysis failed on it;
- ``level_at_scan_edge``: a level lies within one slice of the first or last slice, so the
  level may be outside the scan and was extrapolated;
- ``ambiguous_slice_selection``: a network's output crosses its threshold more than once
  (sigmoid 0.5, or the level's ``z_pos``), so the level is not unique;
- ``implausible_muscle_area``: skeletal muscle at a level below 40 or above 400 cm² (adult
  L3 muscle areas lie within about 70 to 250 cm²): the slice is likely not at the level, or the
  body is cut by the field of view.

Among the series left, the best is chosen by :func:`inference.bodycomp.series_choice.choose_series`
(soft-tissue kernel, 2 to 5 mm slices, thinner, more slices, smallest UID).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from tqdm import tqdm

from dicom_node.config import AnalysisSettings, NodeConfig, ResultKind, SeriesNumbers, build_config
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.receive.files import iter_files
from dicom_node.receive.spool import write_atomic
from dicom_node.run.pipeline import LoadedSeries, identity_for, load_sources, report_results, run_analysis
from dicom_node.schedule.selection import select_series
from dicom_node.state.records import SeriesInfo
from inference.base import AnalysisResult
from inference.bodycomp.analysis import BodyCompositionAnalysis
from inference.bodycomp.config import ModelConfigError
from inference.bodycomp.plots import plot_slice_selection, save_slice_pngs
from inference.bodycomp.series_choice import SeriesCandidate, choose_series
from offline.analyze import safe_name, series_info
from reports.preview import render_report_png

logger = logging.getLogger(__name__)

#: Plausible skeletal muscle area at a level, cm² (see the module docstring).
MUSCLE_AREA_CM2 = (40.0, 400.0)
#: Of the node's result objects, the runner files only the SEG (``--dicom_seg``).
DICOM_OUTPUTS: tuple[ResultKind, ...] = ("seg",)
RUN_LOG_FIELDS = ("study", "MRN", "ACC", "found", "folder", "series_processed", "error")


@dataclass(frozen=True)
class StudyRequest:
    """One CSV row: the study folder name, and MRN and ACC when the CSV has them."""

    name: str
    mrn: str = ""
    acc: str = ""


@dataclass(frozen=True)
class RunOptions:
    """The runner's options (the command line's flags)."""

    num_threads: int = 1
    segmentation_range_mm: float = 0.0
    keep_existing: bool = False
    rerun_exceptions: bool = False
    recursive: bool = False
    studies_at_any_depth: bool = False
    dicom_seg: bool = False
    min_slices_per_series: int = 20
    device: str = "cpu"
    progress: bool = True


@dataclass(frozen=True)
class ResultSettings:
    """What the DICOM SEG takes from the node configuration: the analysis' series numbers, the node's AE title."""

    series_numbers: SeriesNumbers
    node_name: str


def result_settings(analysis_name: str, config: NodeConfig | None = None) -> ResultSettings:
    """Return the series numbers and node name a configuration gives an analysis's results.

    Parameters
    ----------
    analysis_name
        The analysis, as named in ``[analyses]``.
    config
        The node configuration (default: the configuration defaults). An analysis it does not
        configure gets the defaults of a configured one.

    Returns
    -------
    ResultSettings
        The series numbers and ``node.ae_title``.
    """
    config = build_config({}, source="defaults") if config is None else config
    settings = config.analyses.get(analysis_name) or AnalysisSettings(plugin=analysis_name)
    return ResultSettings(settings.series_numbers, config.node.ae_title)


def read_study_csv(path: Path) -> list[StudyRequest]:
    """Read the studies to process: columns ``MRN`` and ``ACC`` (folder ``MRN_ACC``) or ``StudyName``.

    Raises
    ------
    ConfigError
        If the file cannot be read or has neither column set.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = {name.strip() for name in reader.fieldnames or ()}
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if {"MRN", "ACC"} <= columns:
        return [StudyRequest(f"{r['MRN']}_{r['ACC']}", r["MRN"], r["ACC"]) for r in rows if r["MRN"]]
    if "StudyName" in columns:
        return [StudyRequest(r["StudyName"]) for r in rows if r["StudyName"]]
    raise ConfigError(f"{path}: needs columns MRN and ACC, or StudyName (found {sorted(columns)})")


def read_directory_list(path: Path) -> list[Path]:
    """Folders listed one per line in a text file (blank lines and ``#`` comments skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the directory list: {exc}") from None
    return [Path(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def find_study_folders(input_dirs: Sequence[Path], names: set[str], recursive: bool) -> dict[str, Path]:
    """Map study names to folders of that name in the input folders (the first found wins).

    ``recursive`` finds study folders at any depth below an input folder, not only directly in it.
    """
    found: dict[str, Path] = {}
    for root in input_dirs:
        if not root.is_dir():
            logger.warning("input folder %s does not exist", root)
            continue
        candidates = root.rglob("*") if recursive else root.iterdir()
        for folder in sorted(candidates):
            if folder.name in names and folder.is_dir():
                if folder.name in found and found[folder.name] != folder:
                    logger.warning("study %s in %s and %s: using the first", folder.name, found[folder.name], folder)
                    continue
                found[folder.name] = folder
    return found


def _read_header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError):
        return None


def scan_series(
    folder: Path, threads: int, recursive: bool = True
) -> dict[str, tuple[SeriesInfo, list[Path], Dataset]]:
    """Group the DICOM files of a study folder (any names) by series, headers read in threads.

    ``recursive`` also reads the files in its sub-folders at any depth; otherwise only the
    files directly in ``folder``.
    """
    if recursive:
        paths = list(iter_files(folder, include_hidden=True))
    else:
        paths = sorted(path for path in folder.iterdir() if path.is_file())
        if not paths and any(path.is_dir() for path in folder.iterdir()):
            logger.info("%s holds only sub-folders: -R/--recursive reads the files in them", folder)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        headers = list(pool.map(_read_header, paths))
    grouped: dict[str, tuple[list[Path], Dataset]] = {}
    for path, ds in zip(paths, headers, strict=True):
        uid = str(ds.get("SeriesInstanceUID", "")) if ds is not None else ""
        if ds is None or not uid:
            logger.debug("skipping %s: not a DICOM image", path)
            continue
        grouped.setdefault(uid, ([], ds))[0].append(path)
    return {uid: (series_info(ds, len(files)), files, ds) for uid, (files, ds) in grouped.items()}


def _kernel(ds: Dataset) -> str:
    value = ds.get("ConvolutionKernel", "")
    return "\\".join(str(v) for v in value) if isinstance(value, (list, MultiValue)) else str(value)


def _write_series_outputs(
    stem: str, info: SeriesInfo, result: AnalysisResult, loaded: LoadedSeries, analysis_name: str,
    results_dir: Path, options: RunOptions, settings: ResultSettings,
) -> dict[str, str]:
    files: dict[str, str] = {}
    identity = identity_for(result, settings.node_name)
    png = render_report_png(
        loaded.sources, result.label_map, result.structures, result.measurements,
        key_slices=result.key_slices or None, title=result.title, model_name=result.model_name,
        model_version=result.model_version, method=result.method, identity=identity,
    )
    preview = results_dir / "previews" / f"{stem}_preview.png"
    Image.fromarray(png).save(preview)
    files["preview"] = str(preview)
    plot = results_dir / "plots" / f"{stem}_slice_selection.png"
    plot_slice_selection(result.summary, plot, title=stem)
    files["slice_selection_plot"] = str(plot)
    label_map = np.asarray(result.label_map)
    if options.segmentation_range_mm > 0:
        folder = results_dir / "all_slices" / stem
        save_slice_pngs(loaded.volume.array, label_map, result.summary["levels"], folder)
        files["all_slices"] = str(folder)
    if options.dicom_seg:
        built = report_results(
            result, loaded.sources, study_uid=info.study_uid, series_uid=info.series_uid,
            analysis=analysis_name, series_numbers=settings.series_numbers,
            node_name=settings.node_name, kinds=DICOM_OUTPUTS,
        )
        seg = built.objects.get("seg")
        if seg is not None:
            path = results_dir / "dicom_seg" / f"{stem}_seg.dcm"
            seg.save_as(path, enforce_file_format=True)
            files["dicom_seg"] = str(path)
    return files


def _reason(exc: BaseException) -> str:
    """Name the error that made a series fail: the reader's or the analysis' own, not the pipeline's wrapper.

    The pipeline steps wrap what went wrong in :class:`~dicom_node.errors.DicomNodeError`; the
    runner's records have always named the underlying error (``InputError: ...``).
    """
    cause = exc.__cause__ if isinstance(exc, DicomNodeError) and exc.__cause__ is not None else exc
    return f"{type(cause).__name__}: {cause}"


def process_study(
    request: StudyRequest, folder: Path, analysis: BodyCompositionAnalysis, results_dir: Path,
    options: RunOptions, settings: ResultSettings | None = None,
) -> dict[str, Any]:
    """Analyse every usable series of one study folder and write its per-series outputs.

    Each series goes through the node's pipeline steps (load, infer, and for ``--dicom_seg``
    report); ``settings`` default to :func:`result_settings` of the analysis.

    Returns
    -------
    dict
        The study record (``json_files``): the series processed, failed or passed over, and
        ``error`` when no series could be measured.
    """
    started = time.perf_counter()
    settings = result_settings(analysis.name) if settings is None else settings
    record: dict[str, Any] = {"study": request.name, "MRN": request.mrn, "ACC": request.acc,
                              "found": True, "folder": str(folder), "error": None, "series": [],
                              "passed_over": []}
    series = scan_series(folder, options.num_threads, options.recursive)
    # every usable series is measured here; filtered_summary.csv then keeps the best one
    every_series = dataclasses.replace(analysis.rule, choose=None)
    selection = select_series([info for info, _, _ in series.values()], every_series,
                              options.min_slices_per_series)
    record["passed_over"] = [{"series_instance_uid": info.series_uid, "description": info.description,
                              "reason": reason} for info, reason in selection.passed_over]
    for info in selection.selected:
        _, paths, header = series[info.series_uid]
        entry: dict[str, Any] = {
            "series_instance_uid": info.series_uid, "description": info.description,
            "series_number": header.get("SeriesNumber"), "kernel": _kernel(header),
            "slice_thickness_mm": info.slice_thickness, "n_images": info.instance_count,
        }
        try:
            loaded = load_sources(paths, threads=options.num_threads)
            result = run_analysis(analysis, loaded.volume)
            stem = f"{safe_name(request.name)}_{info.series_uid}"
            files = _write_series_outputs(stem, info, result, loaded, analysis.name, results_dir,
                                          options, settings)
        except (DicomNodeError, OSError, ValueError, RuntimeError) as exc:
            logger.warning("study %s series %s failed: %s", request.name, info.series_uid, exc)
            record["series"].append({**entry, "state": "failed", "reason": _reason(exc)})
            continue
        record["series"].append({
            **entry, "state": "done", "files": files, "model_name": result.model_name,
            "model_version": result.model_version, "method": result.method,
            "measurements": [{"name": m.name, "value": round(float(m.value), 3), "unit": m.unit[0]}
                             for m in result.measurements],
            "details": result.summary,
        })
    done = [s for s in record["series"] if s["state"] == "done"]
    if not selection.selected:
        if not series and not options.recursive and any(path.is_dir() for path in folder.iterdir()):
            record["error"] = ("no usable series: no DICOM images directly in the study folder "
                               "(-R/--recursive reads its sub-folders)")
        else:
            record["error"] = f"no usable series: {selection.explain() or 'no DICOM images found'}"
    elif not done:
        record["error"] = "; ".join(f"{s['series_instance_uid']}: {s['reason']}" for s in record["series"])
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def _series_row(record: dict[str, Any], series: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "study": record["study"], "MRN": record["MRN"], "ACC": record["ACC"],
        "series_instance_uid": series["series_instance_uid"], "description": series["description"],
        "kernel": series["kernel"], "slice_thickness_mm": series["slice_thickness_mm"],
        "n_images": series["n_images"], "state": series["state"],
        "path": series.get("details", {}).get("path", ""), "flags": "",
    }
    flags: list[str] = []
    if series["state"] != "done":
        row["reason"] = series.get("reason", "")
        row["flags"] = "failed"
        return row
    details = series["details"]
    selection = details.get("slice_selection", {})
    n = int(details.get("n_slices", 0))
    for level, values in details["levels"].items():
        row[f"{level}_z_mm"] = values["z_mm"]
        row[f"{level}_slice_position"] = values["slice_position"]
        row[f"{level}_slices_used"] = values["slices"]
        for compartment, stats in values["compartments"].items():
            for key, value in stats.items():
                row[f"{level}_{compartment}_{key}"] = value
        if n and not 1.0 <= values["slice_position"] <= n - 2.0:
            flags.append("level_at_scan_edge")
        muscle = values["compartments"].get("muscle", {}).get("area_cm2")
        if muscle is not None and not MUSCLE_AREA_CM2[0] <= muscle <= MUSCLE_AREA_CM2[1]:
            flags.append("implausible_muscle_area")
        mode = selection.get("mode")
        curve = selection.get("curves", {}).get(level if mode == "sigmoid" else "regression")
        if mode in ("sigmoid", "regression") and curve:
            target = 0.5 if mode == "sigmoid" else float(selection["z_pos"][level])
            above = np.asarray(curve) >= target
            if int(np.count_nonzero(above[1:] != above[:-1])) > 1:
                flags.append("ambiguous_slice_selection")
    missing = details.get("levels_not_found", {})
    if missing:
        row["levels_not_found"] = " ".join(missing)
        flags.append("level_not_found")
    row["flags"] = ";".join(dict.fromkeys(flags))
    return row


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], first: Sequence[str]) -> None:
    fields = list(first) + sorted({k for row in rows for k in row} - set(first))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def filter_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One best unflagged series per study (the rules in this module's docstring)."""
    best: list[dict[str, Any]] = []
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if not row["flags"]:
            by_study.setdefault(row["study"], []).append(row)
    for study_rows in by_study.values():
        candidates = {row["series_instance_uid"]: row for row in study_rows}
        chosen = choose_series([
            SeriesCandidate(uid, row["kernel"], row["slice_thickness_mm"], int(row["n_images"]))
            for uid, row in candidates.items()
        ])
        best.append(candidates[chosen.series_uid])
    return best


def write_summaries(results_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write ``run_log.csv``, ``summary.csv`` and ``filtered_summary.csv`` from study records."""
    log_rows = [{
        "study": r["study"], "MRN": r["MRN"], "ACC": r["ACC"], "found": r["found"], "folder": r["folder"],
        "series_processed": sum(1 for s in r["series"] if s["state"] == "done"), "error": r["error"] or "",
    } for r in records]
    _write_csv(results_dir / "run_log.csv", log_rows, RUN_LOG_FIELDS)
    rows = [_series_row(r, s) for r in records for s in r["series"]]
    first = ("study", "MRN", "ACC", "series_instance_uid", "description", "state", "path", "flags")
    _write_csv(results_dir / "summary.csv", rows, first)
    _write_csv(results_dir / "filtered_summary.csv", filter_rows(rows), first)


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def run_csv(
    csv_path: Path, config_path: Path, results_dir: Path, input_dirs: Sequence[Path],
    options: RunOptions, *, node_config: NodeConfig | None = None,
) -> dict[str, Any]:
    """Process every study of a CSV; one study's failure never stops the batch.

    Parameters
    ----------
    csv_path
        Columns ``MRN`` and ``ACC``, or ``StudyName``.
    config_path
        The model configuration (JSON or TOML); one without weights runs the classical path.
    results_dir
        Created if needed.
    input_dirs
        Folders holding the study folders.
    options
        The runner's options.
    node_config
        Where the DICOM SEG's series numbers (the body-composition analysis') and the node's
        AE title come from (default: the configuration defaults).

    Returns
    -------
    dict
        Counts: ``studies``, ``processed``, ``skipped``, ``failed``, ``not_found``.

    Raises
    ------
    ConfigError
        If the CSV or the model configuration is invalid.
    """
    requests = read_study_csv(csv_path)
    try:
        analysis = BodyCompositionAnalysis(
            model_config=config_path, min_slices=options.min_slices_per_series,
            range_mm=options.segmentation_range_mm,
        )
    except ModelConfigError as exc:
        raise ConfigError(str(exc)) from None
    analysis.load(options.device)
    settings = result_settings(analysis.name, node_config)
    for sub in ("json_files", "previews", "plots") + (("all_slices",) if options.segmentation_range_mm else ()) \
            + (("dicom_seg",) if options.dicom_seg else ()):
        (results_dir / sub).mkdir(parents=True, exist_ok=True)
    folders = find_study_folders(input_dirs, {r.name for r in requests}, options.studies_at_any_depth)
    counts = {"studies": len(requests), "processed": 0, "skipped": 0, "failed": 0, "not_found": 0}
    records: dict[str, dict[str, Any]] = {}
    for request in tqdm(requests, desc="studies", unit="study", disable=not options.progress):
        json_path = results_dir / "json_files" / f"{safe_name(request.name)}.json"
        previous = _load_record(json_path) if options.keep_existing else None
        if previous is not None and not (options.rerun_exceptions and previous.get("error")):
            records[request.name] = previous
            counts["skipped"] += 1
            continue
        folder = folders.get(request.name)
        if folder is None:
            record: dict[str, Any] = {"study": request.name, "MRN": request.mrn, "ACC": request.acc,
                                      "found": False, "folder": "", "series": [], "passed_over": [],
                                      "error": "study folder not found in the input folders"}
            counts["not_found"] += 1
        else:
            try:
                record = process_study(request, folder, analysis, results_dir, options, settings)
            except Exception as exc:  # noqa: BLE001 - one broken study never stops the batch
                logger.exception("study %s failed", request.name)
                record = {"study": request.name, "MRN": request.mrn, "ACC": request.acc, "found": True,
                          "folder": str(folder), "series": [], "passed_over": [],
                          "error": f"{type(exc).__name__}: {exc}"}
            counts["failed" if record["error"] else "processed"] += 1
        write_atomic(json_path, json.dumps(record, indent=2, default=str).encode())
        records[request.name] = record
    write_summaries(results_dir, list(records.values()))
    logger.info("run-csv: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def organize(src: Path, dst: Path, *, threads: int = 1) -> dict[str, int]:
    """Copy an unorganised DICOM dump into ``DST/{PatientID}_{AccessionNumber}/`` study folders.

    Identifiers are made file-name safe (:func:`safe_name`); files are named by their
    SOPInstanceUID, so copying twice does not duplicate anything. Files that are not DICOM are
    skipped.

    Returns
    -------
    dict
        ``copied``, ``skipped`` (not DICOM) and ``studies`` counts.
    """
    paths = list(iter_files(src, include_hidden=True))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        headers = list(pool.map(_read_header, paths))
    studies: set[str] = set()
    copied = skipped = 0
    for path, ds in zip(paths, headers, strict=True):
        if ds is None or "SOPInstanceUID" not in ds:
            skipped += 1
            continue
        name = f"{safe_name(str(ds.get('PatientID', '')))}_{safe_name(str(ds.get('AccessionNumber', '')))}"
        target = dst / name / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        studies.add(name)
        copied += 1
    return {"copied": copied, "skipped": skipped, "studies": len(studies)}
