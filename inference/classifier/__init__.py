"""A universal 3D image classifier: task format, planning, five-fold training and the ``predict`` API."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.classifier.predictor import ClassifierPredictor

__all__ = ["predict"]


@lru_cache(maxsize=4)
def _predictor(artifact: Path, stamp: tuple[float, ...]) -> ClassifierPredictor:
    # ``stamp`` (checkpoint modification times) makes a retrained artifact load afresh.
    from inference.classifier.predictor import ClassifierPredictor

    return ClassifierPredictor(artifact)


def predict(
    artifact_path: str | PathLike[str],
    ordered_image_files: Sequence[str | PathLike[str]],
    roi_segmentation_file: str | PathLike[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Classify one case with a trained classifier, ensembling all of its trained folds.

    Parameters
    ----------
    artifact_path
        A trained classifier folder: ``plans.json``, ``dataset.json`` and ``fold_N/``
        (``DATA_ROOT/results/TaskNNN_Name/3d`` after ``dicom-node classifier train``).
    ordered_image_files
        One co-registered NIfTI file per modality, in the order of the task's ``modality``.
    roi_segmentation_file
        The case's ROI segmentation; required exactly when the model was trained with ROIs.

    Returns
    -------
    dict
        ``{classification label: {class name: probability}}``; each label's probabilities sum to 1.

    Raises
    ------
    inference.errors.InputError
        If the files do not fit the model (count, geometry, an ROI missing or superfluous).
    inference.classifier.dataset.ArtifactError
        If ``artifact_path`` is not a trained classifier.
    """
    artifact = Path(artifact_path).resolve()
    stamp = tuple(sorted(p.stat().st_mtime for p in artifact.glob("fold_*/checkpoint_final.pt")))
    predictor = _predictor(artifact, stamp)
    files = [Path(p) for p in ordered_image_files]
    roi = Path(roi_segmentation_file) if roi_segmentation_file is not None else None
    return predictor.predict_files(files, roi)
