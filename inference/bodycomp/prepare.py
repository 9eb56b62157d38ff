"""Training sets for the body-composition trainers, built from CT volumes with tissue label maps and level positions."""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
from PIL import Image
from scipy import ndimage

from inference.bodycomp.analysis import AXIAL_AXCODES
from inference.bodycomp.classical import LEVEL_NAMES
from inference.bodycomp.config import TrainingDataError
from inference.bodycomp.segmentation import CLASS_LABELS
from inference.bodycomp.slice_selection import pad_square, window_hu
from inference.volume import load_series_files, to_model_space

logger = logging.getLogger(__name__)

#: nibabel has no type annotations.
nib: Any = nibabel
#: The body-segmentation input contract: N x 512 x 512 x 1 raw HU.
SEGMENTATION_PX = 512
#: Side of the slice-selection PNGs (the network resizes them to its own input).
SLICE_PNG_PX = 256
AIR_HU = -1024.0
#: TotalSegmentator v2 label of each vertebra (26 S1, 27 L5 ... 32 T12 ... 43 T1, 44 C7 ... 50 C1).
TOTALSEG_V2_VERTEBRAE = {
    name: 50 - index for index, name in enumerate(LEVEL_NAMES)
}


def load_axial_stack(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT (NIfTI file or DICOM folder) as the analysis sees it.

    Returns
    -------
    tuple[numpy.ndarray, numpy.ndarray]
        The float32 stack ``(slices inferior to superior, rows anterior to posterior, columns
        right to left)`` in HU, and the z coordinate (mm, RAS = LPS z) of each slice.
    """
    if path.is_dir():
        volume = load_series_files(sorted(p for p in path.rglob("*") if p.is_file()))
        stack, space = to_model_space(volume, AXIAL_AXCODES)
        z = space.affine[2, 3] + space.affine[2, 0] * np.arange(stack.shape[0])
        return stack, np.asarray(z, dtype=np.float64)
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    stack = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    z = image.affine[2, 3] + image.affine[2, 2] * np.arange(stack.shape[0])
    return stack, np.asarray(z, dtype=np.float64)


def _label_stack(path: Path) -> np.ndarray:
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj)
    return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def to_square(image: np.ndarray, size_px: int, fill: float, order: int) -> np.ndarray:
    """Centre a slice in a square (``fill`` around it) and resize to ``size_px`` (spline ``order``)."""
    square, _ = pad_square(image, fill)
    zoom = size_px / square.shape[0]
    return np.asarray(ndimage.zoom(square, zoom, order=order, mode="nearest", grid_mode=True))[:size_px, :size_px]


def prepare_segmentation_set(
    volume: Path, out_dir: Path, *, labels: Path | None = None, masks: Mapping[str, Path] | None = None,
    val_every: int = 5,
) -> dict[str, int]:
    """Write ``{train,val}_{images,masks}.npy`` for ``train body-segmentation`` from one CT.

    Parameters
    ----------
    volume
        The CT (NIfTI file, or a DICOM folder read by its geometry).
    out_dir
        Created if needed.
    labels
        A label map on the CT's grid: 0 background, 1 muscle, 2 subcutaneous fat, 3 visceral fat.
    masks
        Instead of ``labels``: binary masks per class name (``muscle``, ``subcutaneous_fat``,
        ``visceral_fat``), e.g. TotalSegmentator's tissue masks (``torso_fat`` is visceral).
    val_every
        Every ``val_every``-th slice goes to the validation set.

    Returns
    -------
    dict
        Number of ``train`` and ``val`` slices.

    Raises
    ------
    TrainingDataError
        If no labels are given, or a label map does not match the CT's grid.
    """
    if (labels is None) == (not masks):
        raise TrainingDataError("give either a label map or masks per class")
    stack, _ = load_axial_stack(volume)
    if labels is not None:
        label_stack = _label_stack(labels).astype(np.uint8)
    else:
        label_stack = np.zeros(stack.shape, dtype=np.uint8)
        for name, path in (masks or {}).items():
            mask = _label_stack(path) > 0
            if mask.shape != stack.shape:
                raise TrainingDataError(f"{path}: shape {mask.shape} differs from the CT's {stack.shape}")
            label_stack[mask] = CLASS_LABELS[name]
    if label_stack.shape != stack.shape or int(label_stack.max()) > 3:
        raise TrainingDataError(f"labels must be 0..3 on the CT's grid {stack.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val"):
        index = [k for k in range(stack.shape[0]) if (k % val_every == 0) == (split == "val")]
        images = np.stack([to_square(stack[k], SEGMENTATION_PX, AIR_HU, 1) for k in index])
        targets = np.stack([to_square(label_stack[k], SEGMENTATION_PX, 0, 0) for k in index])
        np.save(out_dir / f"{split}_images.npy", np.round(images).astype(np.int16)[..., None])
        np.save(out_dir / f"{split}_masks.npy", targets.astype(np.uint8)[..., None])
        counts[split] = len(index)
    logger.info("segmentation set in %s: %s", out_dir, counts)
    return counts


def level_z_from_vertebrae(path: Path, levels: Sequence[str], grid_z_mm: np.ndarray | None = None) -> dict[str, float]:
    """z (mm) of each level's vertebral-body centre in a TotalSegmentator v2 vertebra map.

    The body is the anterior half of the vertebra's voxels. ``grid_z_mm`` gives the z of each
    slice when the map shares the CT's grid (then the CT's header is trusted, not the map's).
    Levels not in the map are left out.
    """
    vertebrae = _label_stack(path)
    image = nib.as_closest_canonical(nib.load(path))
    z_of = grid_z_mm if grid_z_mm is not None and grid_z_mm.size == vertebrae.shape[0] else (
        image.affine[2, 3] + image.affine[2, 2] * np.arange(vertebrae.shape[0])
    )
    found = {}
    for level in levels:
        z, y, _ = np.nonzero(vertebrae == TOTALSEG_V2_VERTEBRAE[level])
        if z.size == 0:
            continue
        anterior = y < np.median(y)  # rows run anterior to posterior
        found[level] = float(np.interp(z[anterior].mean(), np.arange(z_of.size), z_of))
    return found


def prepare_slice_selection_set(
    volumes: Sequence[Path], out_dir: Path, *, levels: Sequence[str], vertebrae: Sequence[Path] = (),
    level_z_mm: Mapping[str, float] | None = None, val_every: int = 5,
) -> dict[str, int]:
    """Write ``images/{train,val}/NNNNNN.png`` and ``meta/{train,val}.csv`` for ``train slice-selection``.

    Every axial slice of every volume becomes a PNG (HU windowed L40/W400 to 0..255, centred in
    a square, 256 px) with ``ZOffset_<level>`` = slice z - level z in mm (positive towards the
    head) for each level.

    Parameters
    ----------
    volumes
        CTs (NIfTI files or DICOM folders).
    out_dir
        Created if needed.
    levels
        Levels to write offsets for; each must be found for each volume.
    vertebrae
        TotalSegmentator v2 vertebra maps: one for all volumes, or one per volume. A map with
        as many slices as its volume is taken to share its grid.
    level_z_mm
        Level positions in mm (used for every volume; a vertebra map overrides them).
    val_every
        Every ``val_every``-th slice goes to the validation set.

    Raises
    ------
    TrainingDataError
        If a level's position is unknown for a volume.
    """
    if vertebrae and len(vertebrae) not in (1, len(volumes)):
        raise TrainingDataError("give one vertebra map, or one per volume")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for split in rows:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    (out_dir / "meta").mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(volumes):
        stack, z_mm = load_axial_stack(path)
        known = dict(level_z_mm or {})
        if vertebrae:
            known.update(level_z_from_vertebrae(vertebrae[min(number, len(vertebrae) - 1)], levels, z_mm))
        missing = [level for level in levels if level not in known]
        if missing:
            raise TrainingDataError(f"{path}: positions of {missing} unknown (no vertebra map label, no --level-z)")
        for k in range(stack.shape[0]):
            split = "val" if k % val_every == 0 else "train"
            name = f"{len(rows[split]):06d}.png"
            windowed = to_square(window_hu(stack[k]), SLICE_PNG_PX, 0.0, 1)
            Image.fromarray(np.clip(np.round(windowed), 0, 255).astype(np.uint8)).save(
                out_dir / "images" / split / name)
            row: dict[str, Any] = {"ImageFile": name, "Volume": str(path), "Slice": k,
                                   "ZMillimetres": round(float(z_mm[k]), 2)}
            row.update({f"ZOffset_{level}": round(float(z_mm[k] - known[level]), 2) for level in levels})
            rows[split].append(row)
    for split, split_rows in rows.items():
        with (out_dir / "meta" / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(split_rows[0]) if split_rows else ["ImageFile"])
            writer.writeheader()
            writer.writerows(split_rows)
    counts = {split: len(split_rows) for split, split_rows in rows.items()}
    logger.info("slice-selection set in %s: %s", out_dir, counts)
    return counts
