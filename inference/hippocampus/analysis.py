"""The hippocampus volumetry analysis plugin: MR crop in, anterior/posterior label map and volumes in mm³ out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.base import AnalysisResult, Code, Measurement, SeriesRule, Structure, WarmUpInput
from inference.errors import InputError
from inference.hippocampus.side import determine_side
from inference.hippocampus.quality import SHIPPED_THRESHOLDS, QualityThresholds, assess_quality
from inference.volume import Volume, to_model_space

if TYPE_CHECKING:
    from inference.hippocampus.predict import HippocampusEnsemble

WEIGHTS_DIR = Path(__file__).parent / "weights"
#: The shipped model: the networks whose outputs are averaged (see MODEL_CARD.md).
DEFAULT_WEIGHTS: tuple[Path, ...] = (WEIGHTS_DIR / "hippocampus_unet3d.pt",)

#: The model was trained on MSD crops: RAS array axes at 1 mm (see MODEL_CARD.md).
TRAINING_AXCODES = ("R", "A", "S")
TRAINING_SPACING_MM = (1.0, 1.0, 1.0)

ANATOMICAL_STRUCTURE: Code = ("91723000", "SCT", "Anatomical Structure")
HIPPOCAMPUS: Code = ("5366008", "SCT", "Hippocampus")
VOLUME: Code = ("118565006", "SCT", "Volume")
CUBIC_MILLIMETER: Code = ("mm3", "UCUM", "cubic millimeter")

LATERALITY: dict[str, Code] = {"left": ("7771000", "SCT", "Left"), "right": ("24028007", "SCT", "Right")}

STRUCTURES = (
    Structure(1, "Hippocampus anterior", ANATOMICAL_STRUCTURE, HIPPOCAMPUS, (230, 159, 0)),
    Structure(2, "Hippocampus posterior", ANATOMICAL_STRUCTURE, HIPPOCAMPUS, (86, 180, 233)),
)


class HippocampusAnalysis:
    """Hippocampal volumetry on a cropped T1 MR series (anterior and posterior parts).

    Parameters
    ----------
    weights
        Path of a trained weights file, or several whose outputs are averaged; the shipped
        model when omitted.
    description_pattern
        Regular expression a series description must match to be analysed.
    min_slices
        Minimum number of slices; the node's default when ``None``.
    max_matrix
        Largest Rows/Columns accepted: the model expects a hippocampus crop, not a whole head.
    """

    name = "hippocampus"
    #: The node finds this patient's earlier results and the reports show the change since them.
    uses_prior_results = True
    #: Limits of the low-confidence flag (see quality.py for how they were derived).
    quality_thresholds: QualityThresholds = SHIPPED_THRESHOLDS

    def __init__(
        self,
        weights: str | Sequence[str] | None = None,
        description_pattern: str = r"hippo|hcrop",
        min_slices: int | None = None,
        max_matrix: int = 160,
    ) -> None:
        if weights is None:
            self.weights = DEFAULT_WEIGHTS
        elif isinstance(weights, str):
            self.weights = (Path(weights),)
        else:
            self.weights = tuple(Path(w) for w in weights)
        missing = [str(path) for path in self.weights if not path.is_file()]
        if not self.weights or missing:
            raise ValueError(f"hippocampus weights not found: {', '.join(missing) or 'none given'}")
        self.rule = SeriesRule(
            modalities=("MR",),
            description_pattern=description_pattern,
            min_slices=min_slices,
            max_slices=512,
            max_matrix=max_matrix,
            max_spacing_mm=3.0,
        )
        self._segmenter: HippocampusEnsemble | None = None

    @cached_property
    def _metas(self) -> list[dict[str, Any]]:
        import torch

        return [
            dict(torch.load(path, map_location="cpu", weights_only=True)["meta"])
            for path in self.weights
        ]

    @property
    def _meta(self) -> dict[str, Any]:
        return self._metas[0]

    @property
    def model_name(self) -> str:
        return str(self._meta.get("model_name", "hippocampus-unet3d"))

    @property
    def model_version(self) -> str:
        """The version of the weights; for several, each version and seed, e.g. ``1.0.0s0+1.0.0s1``."""
        if len(self._metas) == 1:
            return str(self._meta.get("version", "unknown"))
        return "+".join(f"{m.get('version')}s{m.get('seed')}" for m in self._metas)

    def warm_up_input(self) -> WarmUpInput | None:
        """A synthetic hippocampus crop of the usual size (32 x 51 x 35 at 1 mm) to warm up on."""
        return WarmUpInput("MR", (32, 51, 35), (1.0, 1.0, 1.0), "warm-up hippocampus crop")

    def load(self, device: str) -> None:
        """Load the network once on ``device``."""
        from inference.hippocampus.predict import HippocampusEnsemble

        self._segmenter = HippocampusEnsemble(self.weights, device)

    def run(self, volume: Volume) -> AnalysisResult:
        """Segment the hippocampus and measure the volume of each part.

        The series is brought into the training orientation (RAS) and spacing (1 mm) from
        its DICOM geometry, and the label map is mapped back to the source slices, so
        volumes are counted on the true source voxel spacing.

        Raises
        ------
        InputError
            If the series is not MR.
        """
        if self._segmenter is None:
            raise RuntimeError("load() must be called before run()")
        if volume.modality != "MR":
            raise InputError(f"series {volume.series_instance_uid} is {volume.modality}, not MR")
        image, space = to_model_space(volume, TRAINING_AXCODES, TRAINING_SPACING_MM)
        model_labels, unmirrored, mirrored = self._segmenter.segment_with_passes(image)
        quality = assess_quality(
            unmirrored, mirrored, model_labels, float(np.prod(TRAINING_SPACING_MM)), self.quality_thresholds
        )
        labels = space.to_source(model_labels)
        side = determine_side(volume.affine, labels)
        voxel_mm3 = float(np.prod(volume.spacing_mm))
        volumes = {s.label: float(np.count_nonzero(labels == s.label)) * voxel_mm3 for s in STRUCTURES}
        measurements = tuple(
            Measurement(f"{s.name} volume", VOLUME, volumes[s.label], CUBIC_MILLIMETER, s.label)
            for s in STRUCTURES
        ) + (Measurement("Total hippocampus volume", VOLUME, sum(volumes.values()), CUBIC_MILLIMETER),)
        area = np.count_nonzero(labels, axis=(1, 2))
        key = tuple(int(k) for k in sorted(np.argsort(area)[::-1][:3]) if area[k] > 0)
        return AnalysisResult(
            analysis=self.name,
            title="Hippocampus volumetry",
            model_name=self.model_name,
            model_version=self.model_version,
            method="deep learning: 3D U-Net trained on MSD Task04 hippocampus",
            structures=tuple(replace(s, laterality=LATERALITY[side.side]) for s in STRUCTURES)
            if side.side in LATERALITY else STRUCTURES,
            measurements=measurements,
            label_map=labels.astype(np.uint8),
            key_slices=key,
            summary={
                "volumes_mm3": {
                    "anterior": round(volumes[1], 1),
                    "posterior": round(volumes[2], 1),
                    "total": round(volumes[1] + volumes[2], 1),
                },
                "voxel_spacing_mm": [round(float(s), 4) for s in volume.spacing_mm],
            },
            quality=quality,
            side=side.side,
            side_reason=side.reason,
        )
