"""The body-composition analysis plugin: CT series in, compartments and their areas and HU at a vertebral level out."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.base import AnalysisResult, Code, Measurement, SeriesRule, Structure, WarmUpInput
from inference.errors import InputError
from inference.bodycomp import classical
from inference.bodycomp.series_choice import choose_series
from inference.bodycomp.config import (
    DEFAULT_CLASSES,
    THORACIC_CLASSES,
    BodyCompModelConfig,
    LevelParams,
    load_model_config,
    parse_model_config,
)
from inference.volume import LPS_TO_RAS, ModelSpace, Volume, to_model_space

logger = logging.getLogger(__name__)

#: Axial stack order used by every stage: slices inferior to superior, rows anterior to
#: posterior, columns patient right to left (the radiological display of an axial slice).
AXIAL_AXCODES = ("S", "P", "L")

CLASSICAL_METHOD = "classical HU thresholds"
#: Where the classical path's skeletal muscle is incomplete, said wherever its method is shown,
#: so that a muscle area there is not read as the whole skeletal muscle area of the slice.
CLASSICAL_LIMITS = "psoas measured beside a vertebral body, not at a disc level"
DEEP_LEARNING_METHOD = "deep learning"
MIXED_METHOD = "deep learning and classical"

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
#: Colours of compartments beyond the three known ones, in the order they are first configured.
EXTRA_COLOURS = ((170, 90, 220), (60, 200, 140), (240, 130, 40), (200, 200, 200), (120, 80, 40), (240, 100, 180))


def generic_structure(name: str, label: int) -> Structure:
    """A compartment a trained model outputs beyond the known three, coded generically as tissue.

    Its segment and measurements carry the configured name (``intermuscular_fat`` ->
    "Intermuscular fat"); category and type are SCT 85756007 "Tissue".
    """
    colour = EXTRA_COLOURS[(label - len(COMPARTMENTS) - 1) % len(EXTRA_COLOURS)]
    return Structure(label, name.replace("_", " ").capitalize(), TISSUE, TISSUE, colour)


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


@dataclass(frozen=True)
class LevelFinding:
    """Where each level lies on the stack, how that was found, and the output along z to plot.

    ``positions`` are fractional slice indices (``None``: not found); ``curves`` name a curve
    (a level for a per-level output) and give one value per slice; ``mode`` is
    ``"classical"``, ``"sigmoid"`` or ``"regression"``.
    """

    positions: dict[str, float | None]
    method: str
    mode: str
    curves: dict[str, list[float]]
    anchor: str = ""
    notes: tuple[str, ...] = ()
    found: dict[str, float] = field(default_factory=dict)


def _weights_version(config: BodyCompModelConfig) -> str:
    """A version that changes with the weights (result UIDs derive from it)."""
    digest = hashlib.sha256()
    paths = [config.slice_selection_weights] + [p.model_weights for p in config.slice_params.values()]
    for path in paths:
        if path is not None:
            digest.update(Path(path).read_bytes())
    return f"0.1.0+{digest.hexdigest()[:12]}"


class BodyCompositionAnalysis:
    """Skeletal muscle, subcutaneous and visceral fat at vertebral levels on an axial CT.

    With no weights configured the classical path runs (HU thresholds, body outline,
    abdominal wall, vertebral level from the spine; see :mod:`inference.bodycomp.classical`).
    With ``slice_selection_weights`` the levels are found by the slice-selection network
    (:mod:`inference.bodycomp.slice_selection`); a level with ``model_weights`` is segmented
    by its U-Net (:mod:`inference.bodycomp.segmentation`). Results say which path made them.

    Parameters
    ----------
    levels
        Vertebral levels to measure, e.g. ``["L3"]`` or ``["T10", "L3"]``; default: the
        configured model's levels, or L3.
    min_slices
        Minimum number of slices of a usable series.
    range_mm
        Multi-slice mode: also segment every slice within this distance of the level and
        average; 0 measures the single slice nearest to the level.
    thoracic_levels
        Levels measured without a visceral class on the classical path; T1 to T10 when ``None``.
    model
        The model configuration as a mapping (the JSON form, or the same keys as a TOML
        table in the node's plugin options); weight paths should be absolute.
    model_config
        Path of a JSON or TOML model configuration file (weights relative to it).

    Raises
    ------
    ValueError
        If a level is unknown, both ``model`` and ``model_config`` are given, or the
        configuration is invalid (:class:`ModelConfigError`).
    """

    name = "body-composition"
    model_name = "bodycomp-classical"
    model_version = "0.1.0"

    def __init__(
        self,
        levels: Sequence[str] | None = None,
        min_slices: int = 20,
        range_mm: float = 0.0,
        thoracic_levels: Sequence[str] | None = None,
        model: Mapping[str, Any] | None = None,
        model_config: str | Path | None = None,
    ) -> None:
        if model is not None and model_config is not None:
            raise ValueError("give the model configuration either inline (model) or as a file (model_config)")
        if model_config is not None:
            config = load_model_config(Path(model_config))
        elif model is not None:
            config = parse_model_config(model, source="options.model")
        else:
            config = None
        chosen = tuple(levels) if levels is not None else (config.levels if config else ("L3",))
        unknown = [level for level in chosen if level not in classical.LEVEL_NAMES]
        if not chosen or unknown:
            raise ValueError(f"levels must be vertebral levels like 'L3', not {list(chosen)}")
        if range_mm < 0 or min_slices < 1:
            raise ValueError("range_mm must be >= 0 and min_slices >= 1")
        self.thoracic_levels = (
            frozenset(thoracic_levels) if thoracic_levels is not None else THORACIC_LEVELS
        )
        if config is None:
            config = BodyCompModelConfig(slice_params={
                level: LevelParams(
                    class_names=THORACIC_CLASSES if level in self.thoracic_levels else DEFAULT_CLASSES
                ) for level in chosen
            })
        missing = [level for level in chosen if level not in config.slice_params]
        if missing:
            raise ValueError(f"levels {missing} are not in the model configuration's slice_params")
        self.config = config
        self.levels = chosen
        #: Label value of every compartment measured: the known three, then further trained classes.
        self.compartments: dict[str, int] = dict(COMPARTMENTS)
        for level in chosen:
            for name in config.slice_params[level].class_names:
                self.compartments.setdefault(name, len(self.compartments) + 1)
        if len(self.compartments) > 255:
            raise ValueError("at most 255 compartments fit a label map")
        self.structures: dict[int, Structure] = {
            label: STRUCTURES.get(label) or generic_structure(name, label)
            for name, label in self.compartments.items()
        }
        self.range_mm = float(range_mm)
        self.rule = SeriesRule(
            modalities=("CT",), min_slices=min_slices, orientation="axial", choose=choose_series
        )
        self.device = "cpu"
        if config.uses_deep_learning:
            self.model_name = "bodycomp-dl"
            self.model_version = _weights_version(config)
        self._selector: Any = None
        self._segmenters: dict[str, Any] = {}

    def warm_up_input(self) -> WarmUpInput | None:
        """A synthetic abdomen CT with a lumbar spine and iliac wings (:mod:`inference.bodycomp.phantom`).

        On the classical path it is analysed like a real CT: levels found, L3 segmented and
        measured, SEG, SC and SR built, so the first real job pays no import, plotting or
        report set-up. With networks they run on it too (a network may find no level in a
        phantom: the warm-up then ends there, logged, and the networks have run once).
        """
        from inference.bodycomp.phantom import SHAPE, SPACING_MM, abdomen_phantom

        return WarmUpInput("CT", SHAPE, SPACING_MM, "warm-up abdomen phantom", image=abdomen_phantom())

    def load(self, device: str) -> None:
        """Load the configured networks onto ``device`` (nothing to load on the classical path)."""
        self.device = device
        if not self.config.uses_deep_learning:
            return
        from inference.bodycomp.segmentation import load_segmenter
        from inference.bodycomp.slice_selection import load_slice_selector

        if self.config.slice_selection_weights is not None:
            self._selector = load_slice_selector(Path(self.config.slice_selection_weights), device)
        self._segmenters = {
            level: load_segmenter(Path(params.model_weights), device, params.class_names)
            for level, params in self.config.slice_params.items()
            if params.model_weights is not None and level in self.levels
        }

    def _find_levels(self, stack: np.ndarray, spacing_mm: tuple[float, float, float]) -> LevelFinding:
        if self.config.slice_selection_weights is None:
            track = classical.find_levels(stack, spacing_mm)
            return LevelFinding(
                positions={level: track.position(level) for level in self.levels},
                method=f"vertebral level from the spine, anchor: {track.anchor}",
                mode="classical",
                curves={"vertebral body HU": [round(float(v), 1) for v in track.profile]},
                anchor=track.anchor,
                notes=track.notes,
                found={k: round(v, 2) for k, v in track.levels.items()},
            )
        from inference.bodycomp.slice_selection import locate_levels, predict_outputs

        if self._selector is None:
            self.load(self.device)
        outputs = predict_outputs(self._selector, stack)
        positions = locate_levels(outputs, self.config)
        if self.config.sigmoid_output:
            curves = {
                level: [round(float(v), 4) for v in outputs[:, params.slice_selection_model_output_index]]
                for level, params in self.config.slice_params.items()
            }
        else:
            curves = {"regression": [round(float(v), 4) for v in outputs[:, 0]]}
        mode = "sigmoid" if self.config.sigmoid_output else "regression"
        return LevelFinding(
            positions={level: positions[level] for level in self.levels},
            method=f"slice-selection network ({mode} output)",
            mode=mode,
            curves=curves,
            found={k: round(v, 2) for k, v in positions.items() if v is not None},
        )

    def _segment(self, level: str, hu_slices: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
        params = self.config.slice_params[level]
        if params.model_weights is None:
            thoracic = level in self.thoracic_levels or "visceral_fat" not in params.class_names
            return np.stack([classical.segment_slice(s, spacing_mm, thoracic=thoracic) for s in hu_slices])
        from inference.bodycomp.segmentation import segment_slices

        if level not in self._segmenters:
            self.load(self.device)
        return segment_slices(self._segmenters[level], hu_slices, label_values=self.compartments)

    def _path(self) -> str:
        segmentation_dl = [self.config.slice_params[level].model_weights is not None for level in self.levels]
        selection_dl = self.config.slice_selection_weights is not None
        if selection_dl and all(segmentation_dl):
            return DEEP_LEARNING_METHOD
        if not selection_dl and not any(segmentation_dl):
            return CLASSICAL_METHOD
        return MIXED_METHOD

    def run(self, volume: Volume) -> AnalysisResult:
        """Find the levels, segment the slices there and measure each compartment.

        Raises
        ------
        InputError
            If the series is not CT or none of the levels can be found in it. A level that is
            not found while others are is named in ``summary["levels_not_found"]`` (why, and
            which levels were found where) and the others are measured.
        """
        if volume.modality != "CT":
            raise InputError(f"series {volume.series_instance_uid} is {volume.modality}, not CT")
        stack, space = to_model_space(volume, AXIAL_AXCODES)
        dz, sy, sx = space.spacing_mm
        finding = self._find_levels(stack, space.spacing_mm)
        to_lps = space_to_lps(space)
        from_source = np.linalg.inv(volume.affine)
        labels = np.zeros(stack.shape, dtype=np.uint8)
        per_level: dict[str, Any] = {}
        measurements: list[Measurement] = []
        used_labels: set[int] = set()
        not_found: dict[str, str] = {}
        centre_slices: list[int] = []
        for level in self.levels:
            position = finding.positions.get(level)
            if position is None or not -0.5 <= position <= stack.shape[0] - 0.5:
                not_found[level] = missing_level_reason(level, position, finding, stack.shape[0], to_lps)
                logger.warning("series %s: %s", volume.series_instance_uid, not_found[level])
                continue
            params = self.config.slice_params[level]
            slices = slices_within(position, stack.shape[0], dz, self.range_mm)
            labels[slices] = self._segment(level, stack[slices], (sy, sx))
            names = [name for name in self.compartments if name in params.class_names]
            if params.model_weights is None and level in self.thoracic_levels:
                names = [name for name in names if name != "visceral_fat"]
            stats = {
                name: measure(stack[slices], labels[slices], (sy, sx), self.compartments[name])
                for name in names
            }
            for name, value in stats.items():
                label = self.compartments[name]
                used_labels.add(label)
                structure = self.structures[label]
                measurements.append(Measurement(
                    f"{level} {structure.name} area", AREA, value.area_cm2, SQUARE_CENTIMETER, label
                ))
                if np.isfinite(value.hu_mean):
                    measurements.append(Measurement(
                        f"{level} {structure.name} mean HU", MEAN_ATTENUATION, value.hu_mean,
                        HOUNSFIELD_UNIT, label,
                    ))
            z_lps = float((to_lps @ np.array([position, 0.0, 0.0, 1.0]))[2])
            source_slices = sorted(
                int(round(float((from_source @ to_lps @ np.array([k, 0.0, 0.0, 1.0]))[0])))
                for k in slices
            )
            centre = int(round(float((from_source @ to_lps @ np.array([round(position), 0.0, 0.0, 1.0]))[0])))
            if centre not in centre_slices:
                centre_slices.append(centre)
            per_level[level] = {
                "slice_position": round(float(position), 2),
                "z_mm": round(z_lps, 1),
                "slices": len(slices),
                "source_slices": source_slices,
                "centre_slice": centre,
                "thoracic": "visceral_fat" not in names,
                "segmentation": DEEP_LEARNING_METHOD if params.model_weights else CLASSICAL_METHOD,
                "compartments": {name: value.as_dict() for name, value in stats.items()},
            }
        if not per_level:
            raise InputError(f"series {volume.series_instance_uid}: " + "; ".join(not_found.values()))
        source_labels = space.to_source(labels)
        key = tuple(centre_slices)  # the chosen (centre) slice of every level measured
        path = self._path()
        segmentation = sorted({v["segmentation"] for v in per_level.values()})
        z_mm = [round(float((to_lps @ np.array([k, 0.0, 0.0, 1.0]))[2]), 2) for k in range(stack.shape[0])]
        return AnalysisResult(
            analysis=self.name,
            title="Body composition",
            model_name=self.model_name,
            model_version=self.model_version,
            method=f"{path} (levels: {finding.method}; segmentation: "
            + " and ".join(f"{s}, {CLASSICAL_LIMITS}" if s == CLASSICAL_METHOD else s for s in segmentation)
            + ")",
            structures=tuple(self.structures[label] for label in sorted(used_labels)),
            measurements=tuple(measurements),
            label_map=source_labels,
            key_slices=key,
            summary={
                "path": path,
                "levels": per_level,
                "level_method": finding.method,
                "level_anchor": finding.anchor,
                "level_notes": list(finding.notes),
                "levels_found": finding.found,
                "levels_not_found": not_found,
                "range_mm": self.range_mm,
                "pixel_spacing_mm": [round(sy, 4), round(sx, 4)],
                "slice_spacing_mm": round(dz, 4),
                "n_slices": int(stack.shape[0]),
                "slice_selection": {
                    "mode": finding.mode,
                    "z_mm": z_mm,
                    "curves": finding.curves,
                    "colours": {lv: self.config.slice_params[lv].regression_plot_colour for lv in self.levels},
                    "z_pos": {lv: self.config.slice_params[lv].z_pos for lv in self.levels},
                },
            },
        )


def missing_level_reason(
    level: str, position: float | None, finding: LevelFinding, n_slices: int, to_lps: np.ndarray
) -> str:
    """Say why ``level`` is not measured, and which levels were found where (in the scan or beyond it)."""

    def z_mm(index: float) -> float:
        return float((to_lps @ np.array([index, 0.0, 0.0, 1.0]))[2])

    inside = [name for name, p in finding.found.items() if -0.5 <= p <= n_slices - 0.5]
    outside = [name for name, p in finding.found.items() if name not in inside]
    where = "; ".join(part for part in (
        "found in the scan: " + ", ".join(f"{name} (z {z_mm(finding.found[name]):.1f} mm)" for name in inside)
        if inside else "no level found in the scan",
        "placed beyond its ends: " + ", ".join(f"{name} (z {z_mm(finding.found[name]):.1f} mm)" for name in outside)
        if outside else "",
    ) if part)
    first, last = sorted((z_mm(0.0), z_mm(n_slices - 1.0)))
    if position is None:
        return (f"vertebral level {level} not found in the scanned range z {first:.1f} to {last:.1f} mm "
                f"({'; '.join(finding.notes) or finding.method}; {where})")
    side = "below" if z_mm(position) < first else "above"
    return (f"vertebral level {level} not found in the scan: placed at z {z_mm(position):.1f} mm, {side} the "
            f"scanned range z {first:.1f} to {last:.1f} mm ({finding.method}; {where})")


def space_to_lps(space: ModelSpace) -> np.ndarray:
    """Return the model-index-to-LPS matrix of a model space (its affine maps to RAS)."""
    return np.asarray(LPS_TO_RAS @ space.affine)
