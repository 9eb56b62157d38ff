"""Analyses without a network: one study folder (``analyze``) or many in parallel (``batch``)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.config import NodeConfig
from dicom_node.errors import DicomNodeError
from dicom_node.receive.files import iter_files
from dicom_node.state.records import SeriesInfo
from dicom_node.run.pipeline import JobSpec, run_job
from dicom_node.run.plugins import create_analyses
from dicom_node.receive.scp import series_attributes
from dicom_node.schedule.selection import select_series
from dicom_node.receive.spool import write_atomic
from inference.base import Analysis

logger = logging.getLogger(__name__)


def scan_study(folder: Path) -> dict[str, tuple[SeriesInfo, list[Path]]]:
    """Return the series found under ``folder`` (recursively, hidden files included; file names do not matter).

    Files that are not DICOM are skipped with a debug log line.
    """
    files: dict[str, list[Path]] = defaultdict(list)
    first: dict[str, Any] = {}
    for path in iter_files(folder, include_hidden=True):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            logger.debug("skipping %s: not DICOM", path)
            continue
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not series_uid:
            continue
        files[series_uid].append(path)
        first.setdefault(series_uid, ds)
    return {uid: (series_info(first[uid], len(paths)), paths) for uid, paths in files.items()}


def series_info(header: Dataset, instance_count: int) -> SeriesInfo:
    """Return what selection rules see of a series, from one of its headers.

    The same attributes, read the same way, as the node records for a received series.
    """
    return SeriesInfo(
        series_uid=str(header.get("SeriesInstanceUID", "")),
        study_uid=str(header.get("StudyInstanceUID", "")),
        instance_count=instance_count,
        **_series_fields(series_attributes(header)),
    )


def _series_fields(attributes: Mapping[str, Any]) -> dict[str, Any]:
    fields = dict(attributes)
    fields["orientation"] = tuple(json.loads(fields["orientation"])) if fields["orientation"] else None
    spacing = json.loads(fields["pixel_spacing"]) if fields["pixel_spacing"] else None
    fields["pixel_spacing"] = (spacing[0], spacing[1]) if spacing else None
    return fields


def analyze_study(
    folder: Path,
    out_dir: Path,
    config: NodeConfig,
    analyses: Mapping[str, Analysis],
) -> dict[str, Any]:
    """Run every configured analysis on one study folder and write results under ``out_dir``.

    Returns a summary: per analysis and selected series, the outcome with its measurements
    or the reason it failed or was not applicable.
    """
    series = scan_study(folder)
    infos = [info for info, _ in series.values()]
    if not infos:
        return {"study": str(folder), "ok": False, "error": "no DICOM images found", "jobs": []}
    jobs: list[dict[str, Any]] = []
    for name, analysis in analyses.items():
        selection = select_series(infos, analysis.rule, config.selection.default_min_slices)
        if not selection.selected:
            jobs.append({"analysis": name, "state": "not_applicable",
                         "reason": f"no series matches: {selection.explain()}"})
            continue
        for info in selection.selected:
            result_dir = out_dir / name / info.series_uid
            result_dir.mkdir(parents=True, exist_ok=True)
            spec = JobSpec(
                job_uid=str(uuid.uuid4()),
                study_uid=info.study_uid,
                series_uid=info.series_uid,
                analysis=name,
                paths=tuple(str(p) for p in series[info.series_uid][1]),
                result_dir=str(result_dir),
                series_numbers=config.analyses[name].series_numbers,
                node_name=config.node.ae_title,
            )
            try:
                outcome = run_job(spec, analysis)
            except DicomNodeError as exc:
                logger.warning("%s on series %s failed: %s", name, info.series_uid, exc)
                jobs.append({"analysis": name, "series_instance_uid": info.series_uid,
                             "state": "failed", "reason": f"{type(exc).__name__}: {exc}"})
                continue
            jobs.append({"analysis": name, "series_instance_uid": info.series_uid, "state": "done",
                         "files": outcome.files, "timings": outcome.timings, **outcome.summary})
    ok = not any(job["state"] == "failed" for job in jobs)
    summary = {"study": str(folder), "ok": ok, "jobs": jobs}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


_BATCH_STATE: dict[str, Any] = {}


def _batch_init(config: NodeConfig, device: str) -> None:
    import torch

    torch.set_num_threads(1)
    analyses = create_analyses(config.analyses)
    for analysis in analyses.values():
        analysis.load(device)
    _BATCH_STATE.update(config=config, analyses=analyses)


def _batch_one(folder: str, out_dir: str) -> dict[str, Any]:
    try:
        return analyze_study(Path(folder), Path(out_dir), _BATCH_STATE["config"], _BATCH_STATE["analyses"])
    except Exception as exc:  # one broken study never stops the batch
        logger.exception("study %s failed", folder)
        return {"study": folder, "ok": False, "error": f"{type(exc).__name__}: {exc}", "jobs": []}


def run_batch(
    folders: Sequence[Path],
    out_dir: Path,
    config: NodeConfig,
    *,
    workers: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Analyse many study folders in parallel processes and write ``summary.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [
        (str(folder), str(out_dir / f"{index:04d}_{safe_name(folder.name, default='study')}"))
        for index, folder in enumerate(folders)
    ]
    results: list[dict[str, Any]] = []
    with ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_batch_init,
        initargs=(config, device),
    ) as pool:
        for result in pool.map(_batch_one, *zip(*targets, strict=True)):
            results.append(result)
            logger.info("%s: %s", result["study"], "ok" if result["ok"] else "FAILED")
    summary = {
        "studies": len(results),
        "succeeded": sum(1 for r in results if r["ok"]),
        "failed": sum(1 for r in results if not r["ok"]),
        "results": results,
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def safe_name(text: str, *, default: str = "UNKNOWN") -> str:
    """Return a file-name-safe version of an identifier or folder name.

    Letters, digits, ``-`` and ``.`` are kept, everything else becomes ``_``; surrounding
    spaces and dots are dropped, so a name never hides a file or climbs out of its folder.

    Parameters
    ----------
    text
        A patient ID, accession number, UID or folder name.
    default
        The name when nothing is left.

    Returns
    -------
    str
        The safe name.
    """
    cleaned = "".join(c if c.isalnum() or c in "-." else "_" for c in text.strip())
    return cleaned.strip(".") or default
