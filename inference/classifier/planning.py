"""Fingerprint a classification task, plan spacing, patch and normalisation, and preprocess its cases."""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from inference.classifier.dataset import (
    Case,
    DatasetError,
    TaskDataset,
    TaskRoots,
    find_task_dir,
    labels_to_json,
    load_dataset,
    preprocessed_dir,
)

logger = logging.getLogger(__name__)

# nibabel has no type annotations: calls through Any keep mypy --strict quiet.
_nib: Any = nib

PLANS_VERSION = 1
#: Model axes: nibabel's closest canonical orientation (RAS), as the node's ``to_model_space``.
AXCODES = ("R", "A", "S")
#: The ROI bounding box is widened by this fraction of its extent on each side.
ROI_MARGIN_FRACTION = 0.05
#: Largest patch in voxels; above it the target spacing is coarsened (CPU-friendly).
MAX_PATCH_VOXELS = 96**3
#: Patch sides are multiples of this (three stride-2 stages in the network).
PATCH_MULTIPLE = 8
#: A spacing ratio above which the coarse axis gets its 10th-percentile spacing (nnU-Net rule).
ANISOTROPY_RATIO = 3.0
#: Foreground voxels sampled per case and modality for the intensity fingerprint.
SAMPLES_PER_CASE = 10_000
#: Modalities normalised with dataset-wide clipping and z-scoring; all others per case.
CT_MODALITIES = frozenset({"CT"})
DEFAULT_CONFIGURATION = "3d"


def read_case(
    image_files: Sequence[Path], roi_file: Path | None, case_id: str
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """Read a case's modalities (and ROI) in the closest RAS orientation.

    Parameters
    ----------
    image_files
        One NIfTI file per modality, in modality order.
    roi_file
        The ROI segmentation, or ``None``.
    case_id
        For error messages.

    Returns
    -------
    tuple
        float32 images ``(modalities, x, y, z)``, the uint8 ROI ``(x, y, z)`` or ``None``,
        and the voxel spacing in millimetres.

    Raises
    ------
    DatasetError
        If a file is unreadable or not 3D, or the modalities and the ROI differ in geometry.
    """
    arrays = []
    reference: Any = None
    for path in [*image_files, *([roi_file] if roi_file is not None else [])]:
        field = "label" if path == roi_file else "image"
        try:
            nii: Any = _nib.as_closest_canonical(_nib.load(path))
        except (OSError, ValueError, _nib.filebasedimages.ImageFileError) as exc:
            raise DatasetError(f"case {case_id}: field {field!r}: cannot read {path.name}: {exc}") from None
        if len(nii.shape) != 3:
            raise DatasetError(f"case {case_id}: field {field!r}: {path.name} is {len(nii.shape)}D, not 3D")
        if reference is None:
            reference = nii
        elif nii.shape != reference.shape or not np.allclose(nii.affine, reference.affine, atol=1e-3):
            raise DatasetError(
                f"case {case_id}: field {field!r}: {path.name} has shape {nii.shape} and a "
                f"different geometry than {Path(image_files[0]).name} {reference.shape}; "
                "modalities and ROI must be co-registered on the same grid"
            )
        if field == "label":
            values = np.asarray(nii.dataobj)
            if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or values.min() < 0:
                raise DatasetError(f"case {case_id}: field 'label': {path.name} holds non-integer values")
            arrays.append(values.astype(np.uint8))
        else:
            arrays.append(np.asarray(nii.get_fdata(dtype=np.float32)))
    spacing = tuple(float(z) for z in reference.header.get_zooms()[:3])
    images = np.stack(arrays[: len(image_files)]).astype(np.float32)
    if not np.all(np.isfinite(images)):
        raise DatasetError(f"case {case_id}: field 'image': NaN or infinite intensities")
    roi = arrays[-1] if roi_file is not None else None
    return images, roi, (spacing[0], spacing[1], spacing[2])


def roi_box(roi: np.ndarray, case_id: str) -> tuple[slice, slice, slice]:
    """Bounding box of the ROI's non-zero voxels widened by 5 % of its extent per side.

    Raises
    ------
    DatasetError
        If the ROI is empty.
    """
    nonzero = np.nonzero(roi)
    if not nonzero[0].size:
        raise DatasetError(f"case {case_id}: field 'label': the ROI segmentation is empty")
    box = []
    for axis, coords in enumerate(nonzero):
        low, high = int(coords.min()), int(coords.max()) + 1
        margin = max(1, math.ceil(ROI_MARGIN_FRACTION * (high - low)))
        box.append(slice(max(0, low - margin), min(roi.shape[axis], high + margin)))
    return box[0], box[1], box[2]


def resample(array: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int) -> np.ndarray:
    """Resample a 3D array to a target spacing (order 1: linear, 0: nearest), corner-aligned.

    An axis whose spacing is within 1 % of the target is left alone.
    """
    factors = [s / t if abs(s / t - 1.0) > 0.01 else 1.0 for s, t in zip(spacing, target, strict=True)]
    if all(f == 1.0 for f in factors):
        return array
    shape = [max(1, round(n * f)) for n, f in zip(array.shape, factors, strict=True)]
    zoom = [new / old for new, old in zip(shape, array.shape, strict=True)]
    result: np.ndarray = ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=False)
    return result


def normalise(images: np.ndarray, schemes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Normalise each modality as planned: CT clip + z-score with dataset foreground stats, else per-case z-score."""
    out = np.empty_like(images, dtype=np.float32)
    for channel, scheme in enumerate(schemes):
        data = images[channel].astype(np.float32)
        if scheme["scheme"] == "ct":
            low, high = scheme["clip"]
            out[channel] = (np.clip(data, low, high) - scheme["mean"]) / max(scheme["std"], 1e-8)
        else:
            out[channel] = (data - float(data.mean())) / max(float(data.std()), 1e-8)
    return out


def preprocess_arrays(
    images: np.ndarray,
    roi: np.ndarray | None,
    spacing: Sequence[float],
    plans: dict[str, Any],
    case_id: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Crop to the ROI (with margin), resample to the target spacing and normalise one case.

    Parameters
    ----------
    images
        ``(modalities, x, y, z)`` intensities in RAS order.
    roi
        The ROI label map, or ``None`` when the model was planned without ROIs (an
        all-foreground mask is then generated).
    spacing
        Voxel spacing of ``images`` in millimetres.
    plans
        The task's plans (see :func:`make_plans`).
    case_id
        For error messages.

    Returns
    -------
    tuple
        float32 data ``(modalities, ...)``, uint8 ROI label map, and properties (shapes, box).

    Raises
    ------
    DatasetError
        If the ROI is empty or holds values the plans do not know.
    """
    properties: dict[str, Any] = {"spacing_mm": list(spacing), "shape": list(images.shape[1:])}
    if roi is not None:
        unknown = set(np.unique(roi).tolist()) - {int(k) for k in plans["roi_labels"]}
        if unknown:
            raise DatasetError(f"case {case_id}: field 'label': values {sorted(unknown)} are not in 'labels'")
        box = roi_box(roi, case_id)
        properties["crop_box"] = [[s.start, s.stop] for s in box]
        images = images[(slice(None), *box)]
        roi = roi[box]
    target = plans["target_spacing_mm"]
    data = np.stack([resample(channel, spacing, target, order=1) for channel in images])
    if roi is None:
        roi_out = np.ones(data.shape[1:], dtype=np.uint8)
    else:
        roi_out = resample(roi, spacing, target, order=0).astype(np.uint8)
    properties["preprocessed_shape"] = list(data.shape[1:])
    return normalise(data, plans["normalisation"]), roi_out, properties


def _case_fingerprint(case: Case) -> dict[str, Any]:
    images, roi, spacing = read_case(case.image_files, case.roi_file, case.case_id)
    rng = np.random.default_rng(zlib.crc32(case.case_id.encode()))
    if roi is not None:
        box = roi_box(roi, case.case_id)
        extent_mm = [(s.stop - s.start) * sp for s, sp in zip(box, spacing, strict=True)]
        mask = roi > 0
        values = sorted(int(v) for v in np.unique(roi))
    else:
        extent_mm = [n * sp for n, sp in zip(images.shape[1:], spacing, strict=True)]
        mask = np.ones(images.shape[1:], dtype=bool)
        values = []
    samples = []
    for channel in images:
        voxels = channel[mask]
        samples.append(rng.choice(voxels, min(SAMPLES_PER_CASE, voxels.size), replace=False).tolist())
    return {"case_id": case.case_id, "spacing_mm": list(spacing), "shape": list(images.shape[1:]),
            "extent_mm": extent_mm, "roi_values": values, "samples": samples}


def _map(function: Callable[[Any], Any], items: Sequence[Any], processes: int) -> list[Any]:
    if processes <= 1 or len(items) < 2:
        return [function(item) for item in items]
    with ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn")) as pool:
        return list(pool.map(function, items, chunksize=4))


def extract_fingerprint(dataset: TaskDataset, processes: int = 1) -> dict[str, Any]:
    """Spacings, sizes, ROI extents and foreground intensity statistics of the training cases.

    Raises
    ------
    DatasetError
        If a case cannot be read or its geometry is inconsistent.
    """
    cases = _map(_case_fingerprint, dataset.training, processes)
    intensity = []
    for channel, modality in enumerate(dataset.modalities):
        pooled = np.concatenate([np.asarray(c["samples"][channel], dtype=np.float64) for c in cases])
        intensity.append({
            "modality": modality, "mean": float(pooled.mean()), "std": float(pooled.std()),
            "percentile_00_5": float(np.percentile(pooled, 0.5)),
            "percentile_99_5": float(np.percentile(pooled, 99.5)),
            "min": float(pooled.min()), "max": float(pooled.max()),
        })
    if dataset.roi_labels is not None:
        for c in cases:
            unknown = set(c["roi_values"]) - set(dataset.roi_labels)
            if unknown:
                raise DatasetError(
                    f"case {c['case_id']}: field 'label': values {sorted(unknown)} are not in 'labels'"
                )
    class_counts = {
        label.name: [sum(1 for case in dataset.training if case.targets[label.name] == k)
                     for k in range(len(label.classes))]
        for label in dataset.classification_labels
    }
    return {
        "cases": [{k: v for k, v in c.items() if k != "samples"} for c in cases],
        "intensity": intensity,
        "class_counts": class_counts,
        "uses_roi": dataset.uses_roi,
    }


def _patch_size(extents: np.ndarray, spacing: np.ndarray) -> list[int]:
    shape = np.percentile(extents, 95, axis=0) / spacing
    return [int(PATCH_MULTIPLE * math.ceil(s / PATCH_MULTIPLE)) for s in shape]


def make_plans(dataset: TaskDataset, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Choose the target spacing, patch size, normalisation and training configuration.

    The target spacing is the median spacing (the coarse axis of anisotropic data takes its
    10th percentile). The patch covers the 95th percentile of the (ROI-cropped) extents at
    that spacing, in multiples of 8; above :data:`MAX_PATCH_VOXELS` the spacing is coarsened
    so the whole crop still fits (classification needs the whole object, not a part).
    """
    spacings = np.array([c["spacing_mm"] for c in fingerprint["cases"]], dtype=np.float64)
    extents = np.array([c["extent_mm"] for c in fingerprint["cases"]], dtype=np.float64)
    target = np.median(spacings, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] / max(float(np.min(target)), 1e-6) > ANISOTROPY_RATIO:
        target[coarse] = np.percentile(spacings[:, coarse], 10)
    patch = _patch_size(extents, target)
    while math.prod(patch) > MAX_PATCH_VOXELS:
        target = target * 1.1
        patch = _patch_size(extents, target)
    normalisation = []
    for stats in fingerprint["intensity"]:
        if stats["modality"].upper() in CT_MODALITIES:
            normalisation.append({
                "scheme": "ct", "clip": [stats["percentile_00_5"], stats["percentile_99_5"]],
                "mean": stats["mean"], "std": stats["std"],
                "description": "clip to the foreground 0.5-99.5 percentiles, z-score with foreground mean/std",
            })
        else:
            normalisation.append({"scheme": "zscore", "description": "z-score per case over the crop"})
    roi_labels = dataset.roi_labels or {0: "background", 1: "foreground"}
    return {
        "plans_version": PLANS_VERSION,
        "task": dataset.task_dir.name,
        "modalities": list(dataset.modalities),
        "classification_labels": labels_to_json(dataset.classification_labels),
        "uses_roi": dataset.uses_roi,
        "roi_labels": {str(k): v for k, v in roi_labels.items()},
        "roi_margin_fraction": ROI_MARGIN_FRACTION,
        "axcodes": list(AXCODES),
        "target_spacing_mm": [float(s) for s in target],
        "normalisation": normalisation,
        "configurations": {
            DEFAULT_CONFIGURATION: {
                "patch_size": patch,
                "batch_size": 8,
                "epochs": 60,
                "learning_rate": 1e-3,
                "weight_decay": 1e-4,
                "architecture": {"width": 16, "dropout": 0.3},
                "mirror_axes": [],
                "intensity_augmentation": True,
            },
        },
    }


def _preprocess_one(job: tuple[Case, dict[str, Any], str]) -> dict[str, Any]:
    case, plans, out_dir = job
    images, roi, spacing = read_case(case.image_files, case.roi_file, case.case_id)
    data, roi_out, properties = preprocess_arrays(images, roi, spacing, plans, case.case_id)
    np.save(Path(out_dir) / f"{case.case_id}.npy", data)
    np.save(Path(out_dir) / f"{case.case_id}_roi.npy", roi_out)
    return {"case_id": case.case_id, "targets": case.targets, **properties}


def five_fold_split(dataset: TaskDataset) -> list[dict[str, list[str]]]:
    """A fixed, stratified five-fold split of the training cases.

    Cases are grouped by their tuple of target values, each group is sorted and shuffled with
    a fixed seed (12345), and its cases are dealt to folds 0-4 in turn, continuing where the
    previous group stopped. The split depends only on the case ids and targets.
    """
    groups: dict[tuple[int, ...], list[str]] = {}
    for case in dataset.training:
        key = tuple(case.targets[label.name] for label in dataset.classification_labels)
        groups.setdefault(key, []).append(case.case_id)
    rng = np.random.default_rng(12345)
    folds: list[list[str]] = [[] for _ in range(5)]
    position = 0
    for key in sorted(groups):
        for case_id in rng.permutation(sorted(groups[key])).tolist():
            folds[position % 5].append(str(case_id))
            position += 1
    every = sorted(case.case_id for case in dataset.training)
    return [{"train": sorted(set(every) - set(fold)), "val": sorted(fold)} for fold in folds]


def plan_and_preprocess(
    data_root: Path | TaskRoots,
    task: str | int,
    *,
    fingerprint_processes: int = 1,
    preprocess_processes: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Validate, fingerprint, plan and preprocess a task into ``<preprocessed>/TaskNNN_Name``.

    ``<preprocessed>`` is ``DATA_ROOT/preprocessed`` in both layouts, or ``$nnUNet_preprocessed``.

    Writes ``dataset.json`` (the raw one, with ``labels`` added when ROI masks are generated),
    ``fingerprint.json``, ``plans.json``, ``splits_final.json``, ``cases.json`` and per case
    ``CASE.npy`` (normalised images) and ``CASE_roi.npy`` (ROI label map).

    Parameters
    ----------
    data_root
        The data root in either layout, or its resolved roots (see ``task_roots``).
    task
        Task id or folder name.
    fingerprint_processes, preprocess_processes
        Worker processes for the fingerprint and the preprocessing (``-tl``, ``-tf``).
    progress
        Called with one line per stage.

    Returns
    -------
    pathlib.Path
        The preprocessed folder.

    Raises
    ------
    DatasetError
        If the task does not follow the format.
    """
    report = progress or (lambda line: None)
    started = time.perf_counter()
    dataset = load_dataset(find_task_dir(data_root, task))
    out = preprocessed_dir(data_root, dataset.task_dir.name)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    report(f"{dataset.task_dir.name}: {len(dataset.training)} training cases, modalities "
           f"{list(dataset.modalities)}, ROI {'given' if dataset.uses_roi else 'generated (all foreground)'}")
    fingerprint = extract_fingerprint(dataset, fingerprint_processes)
    plans = make_plans(dataset, fingerprint)
    report(f"target spacing {[round(s, 3) for s in plans['target_spacing_mm']]} mm, patch "
           f"{plans['configurations'][DEFAULT_CONFIGURATION]['patch_size']}")
    jobs = [(case, plans, str(out / "cases")) for case in dataset.training]
    properties = _map(_preprocess_one, jobs, preprocess_processes)
    raw = dict(dataset.raw)
    if not dataset.uses_roi:
        raw["labels"] = plans["roi_labels"]
    files = {
        "dataset.json": raw,
        "fingerprint.json": fingerprint,
        "plans.json": plans,
        "splits_final.json": five_fold_split(dataset),
        "cases.json": {p["case_id"]: p for p in properties},
    }
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    report(f"preprocessed {len(properties)} cases into {out} in {time.perf_counter() - started:.1f} s")
    return out
