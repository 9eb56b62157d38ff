"""The body-composition analysis plugin: CT series in, compartments and their areas and HU at a vertebral level out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.base import AnalysisResult, Code, InputError, Measurement, SeriesRule, Structure
from inference.bodycomp import classical
from inference.volume import LPS_TO_RAS, ModelSpace, Volume, to_model_space

logger = logging.getLogger(__name__)

#: Axial stack order used by every stage: slices inferior to superior, rows anterior to
#: posterior, columns patient right to left (the radiological display of an axial slice).
AXIAL_AXCODES = ("S", "P", "L")

CLASSICAL_METHOD = "classical HU thresholds"
DEEP_LEARNING_METHOD = "deep learning"

TISSUE: Code = ("85756007", "SCT", "Tissue")
SKELETAL_MUSCLE: Code = ("127954009", "SCT", "Skeletal muscle structure")
ADIPOSE_TISSUE: Code = ("55603005", "SCT", "Adipose tissue")
AREA: Code = ("42798000", "SCT", "Area")
MEAN_ATTENUATION: Code = ("112031", "DCM", "Attenuation Coefficient")
SQUARE_CENTIMETER: Code = ("cm2", "UCUM", "square centimeter")
HOUNSFIELD_UNIT: Code = ("[hnsf'U]", "UCUM", "Hounsfield unit")

#: Compartment names as used in the JSON model configuration and the label values.
COMPARTMENTS = {
    "muscle": classical.MUSCLE,
    "subcutaneous_fat": classical.SUBCUTANEOUS_FAT,
    "visceral_fat": classical.VISCERAL_FAT,
}
STRUCTURES = {
    classical.MUSCLE: Structure(classical.MUSCLE, "Skeletal muscle", TISSUE, SKELETAL_MUSCLE, (220, 60, 60)),
    classical.SUBCUTANEOUS_FAT: Structure(
        classical.SUBCUTANEOUS_FAT, "Subcutaneous fat", TISSUE, ADIPOSE_TISSUE, (240, 200, 60)
    ),
    classical.VISCERAL_FAT: Structure(
        classical.VISCERAL_FAT, "Visceral fat", TISSUE, ADIPOSE_TISSUE, (60, 160, 240)
    ),
}
#: Levels above the diaphragm have no visceral class (thoracic mode).
THORACIC_LEVELS = frozenset(f"T{i}" for i in range(1, 11))


@dataclass(frozen=True)
class CompartmentStats:
    """Area (mean over the slices used) and HU statistics (pooled) of one compartment."""

    area_cm2: float
    hu_mean: float
    hu_median: float
    hu_std: float

    def as_dict(self) -> dict[str, float]:
        """Return the statistics rounded for JSON."""
        return {
            "area_cm2": round(self.area_cm2, 2),
            "hu_mean": round(self.hu_mean, 1),
            "hu_median": round(self.hu_median, 1),
            "hu_std": round(self.hu_std, 1),
        }


def measure(
    hu_slices: np.ndarray, label_slices: np.ndarray, spacing_mm: tuple[float, float], label: int
) -> CompartmentStats:
    """Measure one compartment on one or several slices.

    Parameters
    ----------
    hu_slices, label_slices
        Arrays of shape ``(n, rows, columns)``.
    spacing_mm
        True row and column pixel spacing in millimetres (areas are counted with it).
    label
        The compartment's label value.

    Returns
    -------
    CompartmentStats
        Zero area and NaN HU statistics where the compartment is empty.
    """
    mask = label_slices == label
    pixel_cm2 = spacing_mm[0] * spacing_mm[1] / 100.0
    area = float(np.count_nonzero(mask)) * pixel_cm2 / max(1, mask.shape[0])
    values = hu_slices[mask]
    if values.size == 0:
        return CompartmentStats(area, float("nan"), float("nan"), float("nan"))
    return CompartmentStats(area, float(values.mean()), float(np.median(values)), float(values.std()))


def slices_within(position: float, n_slices: int, slice_mm: float, range_mm: float) -> list[int]:
    """Slices whose centres lie within ``range_mm`` of ``position`` (at least the nearest one)."""
    centre = int(np.clip(round(position), 0, n_slices - 1))
    if range_mm <= 0:
        return [centre]
    reach = int(np.floor(range_mm / slice_mm + 1e-6))
    return list(range(max(0, centre - reach), min(n_slices, centre + reach + 1)))


class BodyCompositionAnalysis:
    """Skeletal muscle, subcutaneous and visceral fat at vertebral levels on an axial CT.

    With no weights configured the classical path runs (HU thresholds, body outline,
    abdominal wall, vertebral level from the spine; see :mod:`inference.bodycomp.classical`).

    Parameters
    ----------
    levels
        Vertebral levels to measure, e.g. ``["L3"]`` or ``["T10", "L3"]``.
    min_slices
        Minimum number of slices of a usable series.
    range_mm
        Multi-slice mode: also segment every slice within this distance of the level and
        average; 0 measures the single slice nearest to the level.
    thoracic_levels
        Levels measured without a visceral class; T1 to T10 when ``None``.
    """

    name = "body-composition"
    model_name = "bodycomp-classical"
    model_version = "0.1.0"

    def __init__(
        self,
        levels: Sequence[str] = ("L3",),
        min_slices: int = 20,
        range_mm: float = 0.0,
        thoracic_levels: Sequence[str] | None = None,
    ) -> None:
        unknown = [level for level in levels if level not in classical.LEVEL_NAMES]
        if not levels or unknown:
            raise ValueError(f"levels must be vertebral levels like 'L3', not {list(levels)}")
        if range_mm < 0 or min_slices < 1:
            raise ValueError("range_mm must be >= 0 and min_slices >= 1")
        self.levels = tuple(levels)
        self.range_mm = float(range_mm)
        self.thoracic_levels = (
            frozenset(thoracic_levels) if thoracic_levels is not None else THORACIC_LEVELS
        )
        self.rule = SeriesRule(modalities=("CT",), min_slices=min_slices, orientation="axial")
        self.device = "cpu"

    def load(self, device: str) -> None:
        """Nothing to load on the classical path; the device is kept for the deep-learning one."""
        self.device = device

    def run(self, volume: Volume) -> AnalysisResult:
        """Find the levels, segment the slices there and measure each compartment.

        Raises
        ------
        InputError
            If the series is not CT or a level cannot be found in it.
        """
        if volume.modality != "CT":
            raise InputError(f"series {volume.series_instance_uid} is {volume.modality}, not CT")
        stack, space = to_model_space(volume, AXIAL_AXCODES)
        dz, sy, sx = space.spacing_mm
        track = classical.find_levels(stack, space.spacing_mm)
        labels = np.zeros(stack.shape, dtype=np.uint8)
        per_level: dict[str, Any] = {}
        measurements: list[Measurement] = []
        used_labels: set[int] = set()
        for level in self.levels:
            position = track.position(level)
            if position is None or not -0.5 <= position <= stack.shape[0] - 0.5:
                raise InputError(
                    f"series {volume.series_instance_uid}: vertebral level {level} not found "
                    f"({'; '.join(track.notes) or 'spine not followed'}; levels found: "
                    f"{', '.join(track.levels) or 'none'})"
                )
            thoracic = level in self.thoracic_levels
            slices = slices_within(position, stack.shape[0], dz, self.range_mm)
            for k in slices:
                labels[k] = classical.segment_slice(stack[k], (sy, sx), thoracic=thoracic)
            names = ("muscle", "subcutaneous_fat") + (() if thoracic else ("visceral_fat",))
            stats = {
                name: measure(stack[slices], labels[slices], (sy, sx), COMPARTMENTS[name])
                for name in names
            }
            for name, value in stats.items():
                label = COMPARTMENTS[name]
                used_labels.add(label)
                structure = STRUCTURES[label]
                measurements.append(Measurement(
                    f"{level} {structure.name} area", AREA, value.area_cm2, SQUARE_CENTIMETER, label
                ))
                if np.isfinite(value.hu_mean):
                    measurements.append(Measurement(
                        f"{level} {structure.name} mean HU", MEAN_ATTENUATION, value.hu_mean,
                        HOUNSFIELD_UNIT, label,
                    ))
            z_lps = float((space_to_lps(space) @ np.array([position, 0.0, 0.0, 1.0]))[2])
            per_level[level] = {
                "slice_position": round(float(position), 2),
                "z_mm": round(z_lps, 1),
                "slices": len(slices),
                "thoracic": thoracic,
                "compartments": {name: value.as_dict() for name, value in stats.items()},
            }
        source_labels = space.to_source(labels)
        key = tuple(int(k) for k in np.nonzero(source_labels.any(axis=(1, 2)))[0][:3])
        return AnalysisResult(
            analysis=self.name,
            title="Body composition",
            model_name=self.model_name,
            model_version=self.model_version,
            method=f"{CLASSICAL_METHOD} (vertebral level from the spine, anchor: {track.anchor})",
            structures=tuple(STRUCTURES[label] for label in sorted(used_labels)),
            measurements=tuple(measurements),
            label_map=source_labels,
            key_slices=key,
            summary={
                "path": CLASSICAL_METHOD,
                "levels": per_level,
                "level_anchor": track.anchor,
                "level_notes": list(track.notes),
                "levels_found": {k: round(v, 2) for k, v in track.levels.items()},
                "range_mm": self.range_mm,
                "pixel_spacing_mm": [round(sy, 4), round(sx, 4)],
                "slice_spacing_mm": round(dz, 4),
            },
        )


def space_to_lps(space: ModelSpace) -> np.ndarray:
    """Return the model-index-to-LPS matrix of a model space (its affine maps to RAS)."""
    return np.asarray(LPS_TO_RAS @ space.affine)
