"""A trained classifier artifact as a node analysis: series rules from options, findings out (SR + SC)."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.base import AnalysisResult, Code, Finding, SeriesRule
from inference.errors import InputError
from inference.classifier.dataset import labels_from_json
from inference.volume import Volume, to_model_space

if TYPE_CHECKING:
    from inference.classifier.predictor import ClassifierPredictor

logger = logging.getLogger(__name__)

#: Private coding scheme for labels without a ``code`` in dataset.json (PS3.16 8.2: "99" prefix).
PRIVATE_SCHEME = "99DCMNODE"
#: DICOM Modality values a task modality may name directly.
DICOM_MODALITIES = frozenset({"CT", "MR", "PT", "CR", "DX", "MG", "US", "NM", "XA"})


class ClassifierAnalysis:
    """A classifier trained with ``dicom-node classifier train`` run on one series per study.

    Configured in ``node.toml``::

        [analyses.hippo-volume]
        plugin = "classifier"
        options = { artifact = "/models/Task002/3d", description_pattern = "hippo", modalities = ["MR"] }

    The series is reoriented to RAS and resampled to the planned spacing from its DICOM
    geometry, preprocessed as in training, and classified by the ensemble of the artifact's
    folds. Each classification label becomes a finding (predicted class and probabilities),
    which the node files as a TID 1500 SR and an SC summary. Only single-modality artifacts
    trained without ROI segmentations can run here: the node has no ROI for a series.

    Parameters
    ----------
    artifact
        The trained folder (``plans.json``, ``dataset.json``, ``fold_N/``).
    name
        Analysis name in jobs and results.
    title
        Title of the report; the task name by default.
    folds
        Folds to ensemble; all trained folds by default.
    modalities, description_pattern, min_slices, max_slices, orientation, max_spacing_mm, max_matrix
        The series-selection rule (see :class:`inference.base.SeriesRule`); ``modalities``
        defaults to the task's modality when it is a DICOM Modality value.

    Raises
    ------
    ValueError
        ``"<option>: <problem>"`` if the artifact cannot run in the node or an option is bad.
    """

    def __init__(
        self,
        artifact: str,
        name: str = "classifier",
        title: str | None = None,
        folds: list[int] | None = None,
        modalities: list[str] | None = None,
        description_pattern: str | None = None,
        min_slices: int | None = None,
        max_slices: int | None = None,
        orientation: str = "any",
        max_spacing_mm: float | None = None,
        max_matrix: int | None = None,
    ) -> None:
        self.artifact = Path(artifact)
        plans_file = self.artifact / "plans.json"
        if not plans_file.is_file():
            raise ValueError(f"artifact: {self.artifact} has no plans.json (not a trained classifier)")
        plans: dict[str, Any] = json.loads(plans_file.read_text(encoding="utf-8"))
        if plans["uses_roi"]:
            raise ValueError(
                f"artifact: {self.artifact} was trained with ROI segmentations, which the node does "
                "not have for a series; train the task without labelsTr to run it in the node"
            )
        if len(plans["modalities"]) != 1:
            raise ValueError(f"artifact: {len(plans['modalities'])} modalities; the node classifies one series")
        if modalities is None:
            task_modality = str(plans["modalities"][0]).upper()
            if task_modality not in DICOM_MODALITIES:
                raise ValueError(
                    f"modalities: the task modality {plans['modalities'][0]!r} is not a DICOM Modality; "
                    "give modalities, e.g. [\"MR\"]"
                )
            modalities = [task_modality]
        self.plans = plans
        self.labels = labels_from_json(plans["classification_labels"])
        self.name = name
        self.title = title or f"Classifier {plans['task']}"
        self.model_name = f"classifier-{plans['task']}"
        self.folds = folds
        self.rule = SeriesRule(
            modalities=tuple(modalities),
            description_pattern=description_pattern,
            min_slices=min_slices,
            max_slices=max_slices,
            orientation=orientation,
            max_spacing_mm=max_spacing_mm,
            max_matrix=max_matrix,
        )
        self._predictor: ClassifierPredictor | None = None

    @cached_property
    def model_version(self) -> str:
        """Number of folds and a digest of their weights: a retrained model files new results.

        Result UIDs derive from the model version, so it depends on the weights' content,
        not on file dates that a copy of the artifact changes.
        """
        digest = hashlib.sha256()
        files = sorted(self.artifact.glob("fold_*/checkpoint_final.pt"))
        for path in files:
            digest.update(path.read_bytes())
        return f"{len(files)}folds-{digest.hexdigest()[:12]}"

    def load(self, device: str) -> None:
        """Load the fold networks once on ``device``."""
        from inference.classifier.predictor import ClassifierPredictor

        self._predictor = ClassifierPredictor(self.artifact, self.folds, device)

    def _concept(self, index: int) -> Code:
        label = self.labels[index]
        if label.code is not None:
            return label.code
        return (label.name[:16], PRIVATE_SCHEME, label.name.replace("_", " ")[:64])

    def run(self, volume: Volume) -> AnalysisResult:
        """Classify one series.

        Raises
        ------
        InputError
            If the series' modality is not one the rule accepts.
        """
        if self._predictor is None:
            raise RuntimeError("load() must be called before run()")
        if volume.modality not in self.rule.modalities:
            raise InputError(f"series {volume.series_instance_uid} is {volume.modality}, not "
                             f"{' or '.join(self.rule.modalities)}")
        axcodes = tuple(self.plans["axcodes"])
        spacing = tuple(float(s) for s in self.plans["target_spacing_mm"])
        image, _ = to_model_space(volume, (axcodes[0], axcodes[1], axcodes[2]), (spacing[0], spacing[1], spacing[2]))
        probabilities = self._predictor.predict_arrays(
            image[None].astype(np.float32), None, spacing, volume.series_instance_uid
        )
        findings = []
        for index, label in enumerate(self.labels):
            probs = probabilities[label.name]
            findings.append(Finding(
                name=label.name,
                concept=self._concept(index),
                predicted_class=max(probs, key=lambda k: probs[k]),
                probabilities={k: round(v, 4) for k, v in probs.items()},
            ))
        return AnalysisResult(
            analysis=self.name,
            title=self.title,
            model_name=self.model_name,
            model_version=self.model_version,
            method=f"deep learning: I3D-style 3D CNN, ensemble of folds {self._predictor.folds}",
            findings=tuple(findings),
            summary={"task": self.plans["task"], "probabilities": probabilities},
        )
